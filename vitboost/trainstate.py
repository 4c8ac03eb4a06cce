"""Where a run is, and everything else it needs to continue bitwise (torchtitan's TrainState).

``state_dict()`` is the same on every rank (rank 0 writes it as trainer.pt); the RNG streams
differ per rank (``rng_state_dict()``, one file per rank). A checkpoint written under another
world size restores the position and the schedule but not the RNG streams, which belong to
ranks that no longer exist: the run continues correctly, not bitwise.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainState:
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: Any  # TrainBatches: the augmentation's generators (as of the current chunk's start) are part of the stream
    device: torch.device
    scaler: Any = None  # the fp16 loss scale: LossScale (GradScaler under ZeRO-1), one state format
    best: Any = None  # BestWeights under --load_best_model_at_end: which validation was best (its tensors go to DCP)
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    saved_step: int = -1  # the step of the newest checkpoint written or resumed from (not saved)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "best": self.best.trainer_state() if self.best is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.saved_step = self.step
        self._restore_schedule(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.best is not None:
            self.best.load_trainer_state(state.get("best"))

    def _restore_schedule(self, saved: dict[str, Any]) -> None:
        """The schedule's position only; each group's lr follows from it and this run's own groups and
        flags. The checkpoint's groups may be laid out otherwise (a pipeline stage holds some layers'
        groups under --layer_decay), so its per-group peaks (LambdaLR's base_lrs) are not reloaded."""
        s = self.scheduler
        s.last_epoch, s._step_count = saved["last_epoch"], saved.get("_step_count", saved["last_epoch"] + 1)
        s._last_lr = [base * factor(s.last_epoch) for factor, base in zip(s.lr_lambdas, s.base_lrs)]
        for group, lr in zip(s.optimizer.param_groups, s._last_lr):
            group["lr"] = lr

    def rng_state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"torch": torch.get_rng_state(), "augment": self.augment.state_dict(), "cuda": cuda}

    def load_rng_state_dict(self, rng: dict[str, Any] | None) -> None:
        """None (a checkpoint of another world size): the streams go on from this run's seeds."""
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.augment.load_state_dict(rng["augment"])


def trim_metrics(path: Path, state: TrainState) -> list[dict]:
    """Drop the metrics.jsonl rows a resumed run will log again (those after its checkpoint), so the
    file keeps one row per step; return the eval rows kept (the run's history so far). The file is
    rewritten atomically (temp + rename)."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _before(line, state)]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return [row for row in map(json.loads, kept) if "val_loss" in row]


def _before(line: str, state: TrainState) -> bool:
    """True for a row logged before the checkpoint ``state`` was restored from."""
    try:
        row = json.loads(line)
    except ValueError:
        return False  # a line cut by a kill
    if not isinstance(row, dict):
        return False
    if "val_loss" in row and row.get("at_step"):  # --eval_steps: run before its step's checkpoint
        return row.get("step", 0) <= state.step
    if "val_loss" in row:  # an epoch-end eval row: its epoch is the number of epochs completed
        return row.get("epoch", 0) <= state.epoch
    return row.get("step", 0) <= state.step
