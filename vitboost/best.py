"""``--load_best_model_at_end`` (HF Trainer's option; timm keeps a model_best as well): the final test
evaluation and the export use the weights of the best validation, not the last step's.

On a small dataset trained for many epochs the last weights are rarely the best ones seen (the CPU
demo's validation moves by several points between epochs). The best weights so far are kept on the
device beside the parameters, copied on each improving validation. Under FSDP/TP they are shards of
the same placements, and a pipeline stage keeps only its own. Only the trainable tensors are copied: a
LoRA run copies its adapters. Every checkpoint saves them under ``best``, so a resumed run
picks from the whole run, and a checkpoint's export (``vitboost export``, the sharded layouts' export)
takes them. Metrics are the same on every rank (the evaluation all-reduces its sums), so every rank
keeps the same step.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager

import torch
from torch import Tensor

from .regularize import local_shards

KEY = "best"  # the checkpoint's key for these tensors (beside "model", "optim", "ema")


class BestWeights:
    def __init__(self, named_params: list[tuple[str, Tensor]], metric: str):
        self.metric = metric  # "loss": lower is better; "accuracy": higher
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.weights = [p.detach().clone() for p in self.params]
        self._forget()

    def _forget(self) -> None:
        """No validation seen yet."""
        self.value: float | None = None  # the best validation's metric
        self.step = self.epoch = 0
        self.metrics: dict | None = None  # that validation's full result (reported as the final validation)
        self.stale = 0  # validations since the best one (--early_stopping_patience)

    def better(self, value: float) -> bool:
        return self.value is None or (value < self.value if self.metric == "loss" else value > self.value)

    @torch.no_grad()
    def consider(self, step: int, epoch: int, metrics: dict, eval_weights: Callable[[], ContextManager]) -> bool:
        """After a validation: keep the weights it evaluated (the EMA's under --ema) if they are the best
        yet (a tie keeps the earlier ones)."""
        if not self.better(metrics[self.metric]):
            self.stale += 1
            return False
        self.stale = 0
        with eval_weights():
            torch._foreach_copy_(local_shards(self.weights), local_shards(self.params))
        self.value, self.step, self.epoch, self.metrics = float(metrics[self.metric]), step, epoch, metrics
        return True

    @torch.no_grad()
    def restore(self, ema: Any = None) -> bool:
        """Put the best weights in the model (and in the EMA, which evaluation and export swap in);
        False, with the model untouched, when no validation ran."""
        if self.value is None:
            return False
        torch._foreach_copy_(local_shards(self.params), local_shards(self.weights))
        if ema is not None:
            torch._foreach_copy_(local_shards(ema.shadow), local_shards(self.weights))
        return True

    def state_dict(self) -> dict[str, Tensor]:
        """FQN -> best tensor: the live tensors, so DCP loads into them in place."""
        return dict(zip(self.names, self.weights))

    def trainer_state(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "step": self.step, "epoch": self.epoch,
                "stale": self.stale, "metrics": self.metrics}

    def load_trainer_state(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's record of its best validation; one chosen by another metric (or none) is
        dropped: the run picks afresh from its next validation."""
        if not state or state.get("metric") != self.metric or state.get("value") is None:
            self._forget()
            return
        self.value, self.step, self.epoch = state["value"], state["step"], state["epoch"]
        self.metrics, self.stale = state["metrics"], state.get("stale", 0)
