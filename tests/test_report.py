"""--report_to tensorboard: the HF Trainer's tags under <output>/tb, confusion images, clean resumes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import train_args
from vitboost.cli import main

pytest.importorskip("tensorboard")
TRAIN = ("train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "train/img_per_s")
EVAL = ("eval/loss", "eval/accuracy")


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_has_train_and_eval_scalars_and_confusion_images(tiny_beans, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--report_to", "tensorboard")) == 0
    acc = events(out)
    assert set(TRAIN + EVAL + ("test/loss", "test/accuracy")) <= set(acc.Tags()["scalars"])
    assert {"eval/confusion_matrix", "test/confusion_matrix"} <= set(acc.Tags()["images"])
    rows = jsonl(out)
    train_rows, eval_rows = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train_rows])
    assert [e.value for e in acc.Scalars("eval/accuracy")] == pytest.approx([r["val_accuracy"] for r in eval_rows])
    assert [e.step for e in acc.Images("eval/confusion_matrix")] == [3, 6]  # one per epoch
    image = acc.Images("eval/confusion_matrix")[0]
    assert image.width > 100 and image.height > 100  # a rendered figure, not a 3x3 array
    summary = json.loads((out / "summary.json").read_text())
    assert acc.Scalars("test/accuracy")[0].value == pytest.approx(summary["eval"]["test"]["accuracy"])


def test_without_report_to_nothing_is_written(tiny_beans, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--epochs", "1")) == 0
    assert not (out / "tb").exists()


def test_resume_appends_to_tensorboard_without_duplicate_steps(tiny_beans, tmp_path):
    """A run that went on past its step-2 checkpoint, then resumed from it: TensorBoard shows each
    step once, with the values of an uninterrupted run."""
    straight = tmp_path / "straight"
    args = ("--report_to", "tensorboard", "--save_every", "2", "--keep_checkpoints", "10")
    assert main(train_args(tiny_beans, straight, *args)) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)  # everything the run wrote: its events go up to step 6
    for ckpt in (resumed / "checkpoints").iterdir():
        if ckpt.name != "step_00000002":
            shutil.rmtree(ckpt)
    assert main(train_args(tiny_beans, resumed, *args, "--resume", "auto")) == 0
    assert len(list((resumed / "tb").glob("events.out.tfevents.*"))) == 2  # appended, not replaced
    a, b = events(straight), events(resumed)
    for tag in ("train/loss", "eval/accuracy"):
        steps = [e.step for e in b.Scalars(tag)]
        assert steps == sorted(set(steps)) == [e.step for e in a.Scalars(tag)], tag
        assert [e.value for e in b.Scalars(tag)] == [e.value for e in a.Scalars(tag)], tag
    assert [e.step for e in b.Images("eval/confusion_matrix")] == [3, 6]


def test_unknown_reporter_is_one_error_line(tmp_path, capsys):
    assert main(["train", "--model", "vit-micro", "--report_to", "wandb", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --report_to wandb is not supported" in err
