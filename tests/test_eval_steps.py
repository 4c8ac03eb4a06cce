"""--eval_steps N (HF Trainer's eval_steps): a validation every N optimizer steps besides the epochs' ones,
one validation a step, kept across a resume, and a candidate for --load_best_model_at_end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import stopped_at_step, train_args
from tests.test_best import exported_params, same, saved
from tests.test_cli_errors import fails_with
from vitboost.cli import main


def validations(run: Path) -> list[tuple[int, bool]]:
    """(step, at_step) of each validation row in metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("at_step", False)) for r in rows if "val_loss" in r]


def test_a_validation_every_n_steps_and_one_at_an_epoch_end(tiny_beans, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_beans, run, "--eval_steps", "2")) == 0  # 2 epochs x 3 steps
    # steps 2 and 4; the epochs end at 3 and 6, and step 6's validation is the epoch's, not a second one
    assert validations(run) == [(2, True), (3, False), (4, True), (6, False)]
    history = json.loads((run / "summary.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 3, 4, 6]
    assert history[0]["epoch"] == pytest.approx(2 / 3, abs=1e-3) and history[1]["epoch"] == 1
    assert "step 2 (epoch 0.67): validation loss" in capsys.readouterr().out


def test_a_run_resumed_between_step_validations_repeats_none_and_ends_as_the_straight_run(tiny_beans, tmp_path):
    flags = ("--eval_steps", "2", "--save_every", "2", "--keep_checkpoints", "0", "--no-async_checkpoint")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(train_args(tiny_beans, straight, *flags)) == 0
    with stopped_at_step(5):  # after the step-4 checkpoint
        main(train_args(tiny_beans, broken, *flags))
    assert main(train_args(tiny_beans, broken, *flags, "--resume", "auto")) == 0
    assert validations(broken) == validations(straight) == [(2, True), (3, False), (4, True), (6, False)]
    assert same(exported_params(broken / "model"), exported_params(straight / "model"))
    a, b = (json.loads((r / "summary.json").read_text()) for r in (straight, broken))
    assert a["history"] == b["history"] and a["eval"] == b["eval"]


STEP_LOSSES = {2: 0.9, 4: 0.3, 6: 0.6}  # validation loss by step: the one at step 4 is best


def test_the_best_of_the_step_validations_is_tested_and_exported(tiny_beans, tmp_path, capsys, monkeypatch):
    from vitboost.best import BestWeights
    consider = BestWeights.consider
    monkeypatch.setattr(BestWeights, "consider", lambda self, step, epoch, metrics, weights: consider(
        self, step, epoch, {**metrics, "loss": STEP_LOSSES[step]}, weights))
    run = tmp_path / "run"
    assert main(train_args(tiny_beans, run, "--eval_steps", "2", "--eval_every", "0", "--load_best_model_at_end",
                           "--save_every", "2", "--keep_checkpoints", "0", "--no-async_checkpoint")) == 0
    assert validations(run) == [(2, True), (4, True), (6, True)]
    assert "(step 4), validation loss 0.3000: tested and exported" in capsys.readouterr().out
    exported = exported_params(run / "model")
    assert same(exported, saved(run / "checkpoints" / "step_00000004", "model", exported))
    best = json.loads((run / "summary.json").read_text())["best_model"]
    assert best["step"] == 4 and best["epoch"] == pytest.approx(4 / 3, abs=1e-3)


def test_a_negative_eval_steps_is_refused(capsys, tiny_beans, tmp_path):
    fails_with(capsys, train_args(tiny_beans, tmp_path / "run", "--eval_steps", "-1"), "--eval_steps must be >= 0")
