"""`--report_to`: where training metrics go besides metrics.jsonl (rank 0 only).

``tensorboard`` writes, through ``torch.utils.tensorboard``, under ``<output>/tb``: the HF Trainer's
tags (``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ``train/epoch``, ``eval/loss``,
``eval/accuracy``) plus ``train/img_per_s`` (and fp16's ``train/loss_scale``), and each evaluation's
confusion matrix as an image (``eval/confusion_matrix``; the final test split as ``test/*``). A resumed
run opens the writer with ``purge_step`` = the checkpoint's step + 1, so TensorBoard drops what the
interrupted run logged after that checkpoint and every step appears once.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

REPORTERS = ("none", "tensorboard")
# metrics.jsonl keys -> TensorBoard tags (HF Trainer names where it has one)
TRAIN_TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
              "epoch": "train/epoch", "img_per_s": "train/img_per_s", "loss_scale": "train/loss_scale"}
EVAL_TAGS = {"val_loss": "eval/loss", "val_accuracy": "eval/accuracy"}


def normalize_report_to(value: str | list[str] | None) -> list[str]:
    """HF's spellings: a name, a list, a comma-separated string; "all" is every integration we have."""
    if value is None:
        return ["none"]
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    names = [v.strip().lower() for v in items if v.strip()] or ["none"]
    names = ["tensorboard" if n == "all" else n for n in names]
    return [n for n in dict.fromkeys(names) if n != "none"] or ["none"]


def check_available(names: list[str]) -> str | None:
    """A one-line problem with the requested reporters, or None."""
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        return f"--report_to {unknown[0]} is not supported; choose tensorboard or none"
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        return "--report_to tensorboard needs the tensorboard package; pip install tensorboard (or 'vitboost[tensorboard]')"
    return None


class TensorBoardSink:
    """Scalars of each metrics.jsonl row, and confusion matrices as images, in one event folder."""

    def __init__(self, folder: Path, label_names: list[str], purge_step: int | None, say: Callable = print):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        self.label_names, self.say = label_names, say
        self._eval_step: int | None = None  # the step of the last per-epoch evaluation logged
        self._warned = False

    def log(self, row: dict[str, Any]) -> None:
        tags = TRAIN_TAGS if "loss" in row else EVAL_TAGS if "val_loss" in row else {}
        for key, tag in tags.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["step"])
        if "val_loss" in row:
            self._eval_step = row["step"]
        self.writer.flush()  # a killed run keeps what it logged (and resume purges past its checkpoint)

    def evaluation(self, split: str, step: int, metrics: dict, final: bool) -> None:
        """The confusion image of a per-epoch evaluation; at the end, the final splits' metrics too
        (the validation split only when no per-epoch evaluation was logged at this step)."""
        prefix = "eval" if split == "validation" else split
        if final:
            if prefix == "eval" and self._eval_step == step:
                return
            self.writer.add_scalar(f"{prefix}/loss", metrics["loss"], step)
            self.writer.add_scalar(f"{prefix}/accuracy", metrics["accuracy"], step)
        try:
            from .plots import confusion_figure
            title = f"{split} step {step}: accuracy {metrics['accuracy']:.4f}"
            self.writer.add_figure(f"{prefix}/confusion_matrix", confusion_figure(
                metrics["confusion_matrix"], self.label_names, title), step)
        except ImportError:
            if not self._warned:
                self.say("tensorboard: matplotlib is not installed, so no confusion-matrix images "
                         "(pip install 'vitboost[plot]')")
                self._warned = True
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_sinks(names: list[str], output: Path, label_names: list[str], resumed_step: int | None,
               say: Callable = print) -> list[TensorBoardSink]:
    """The sinks of --report_to; resumed_step: the step of the checkpoint this run resumed from."""
    sinks = []
    if "tensorboard" in names:
        purge = None if resumed_step is None else resumed_step + 1
        sinks.append(TensorBoardSink(output / "tb", label_names, purge, say))
    return sinks
