"""--load_best_model_at_end: the test evaluation and the export use the weights of the best validation
(HF Trainer's option), the last state stays what a resume continues from, and a resumed run still
picks from the whole run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from tests.conftest import eval_rel, make_imagefolder, stopped_at_step, train_args
from tests.test_cli_errors import fails_with
from vitboost.cli import main

# blocking writes: every epoch's checkpoint is on disk (a background write still in flight when the next epoch
# ends skips that epoch's checkpoint, which on a GPU's fast steps happens)
BEST = ("--epochs", "3", "--load_best_model_at_end", "--keep_checkpoints", "0", "--no-async_checkpoint")
LOSSES = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.8, 5: 0.4}  # validation loss by epoch: of 3 epochs, the second is best


@pytest.fixture()
def scripted(monkeypatch):
    """The validations run as they are; their loss is replaced by LOSSES[epoch]."""
    from vitboost.best import BestWeights
    consider = BestWeights.consider

    def scripted_consider(self, step, epoch, metrics, eval_weights):
        return consider(self, step, epoch, {**metrics, "loss": LOSSES[epoch]}, eval_weights)
    monkeypatch.setattr(BestWeights, "consider", scripted_consider)


def exported_params(folder: Path) -> dict[str, torch.Tensor]:
    """An exported folder's parameters as transformers loads them (the names the checkpoints use)."""
    from transformers import ViTForImageClassification
    return {n: p.detach() for n, p in ViTForImageClassification.from_pretrained(folder).named_parameters()}


def saved(folder: Path, key: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds under key ("model", "ema", "best"), for like's names."""
    state = {key: {k: torch.empty_like(v) for k, v in like.items()}}
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    return state[key]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("evaluated", ["model", "ema"], ids=["raw_weights", "ema_weights"])
def test_the_best_validation_is_tested_and_exported_and_the_last_state_is_checkpointed(
        tiny_beans, tmp_path, capsys, scripted, evaluated):
    run = tmp_path / "run"
    ema = ("--ema", "0.9") if evaluated == "ema" else ()
    assert main(train_args(tiny_beans, run, *BEST, *ema)) == 0  # 3 epochs x 3 steps, a checkpoint per epoch
    assert "best model: epoch 2 (step 6), validation loss 0.5000: tested and exported" in capsys.readouterr().out
    exported = exported_params(run / "model")
    ckpts = run / "checkpoints"
    assert same(exported, saved(ckpts / "step_00000006", evaluated, exported))  # what epoch 2's validation evaluated
    assert not same(exported, saved(ckpts / "step_00000009", evaluated, exported))  # not the last weights...
    assert not same(exported, saved(ckpts / "step_00000009", "model", exported))  # ...which the last checkpoint keeps
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_model"] == {"metric": "loss", "value": 0.5, "step": 6, "epoch": 2, "stale": 1,
                                     "stopped_early": False}
    assert summary["eval"]["validation"]["loss"] == 0.5  # that validation's result is the one reported
    # the test split was evaluated on those weights: the exported folder gives the same numbers
    assert main(["eval", "--model", str(run / "model"), "--dataset", str(tiny_beans), "--split", "test",
                 "--cache_dir", str(tmp_path / "cache"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["test"]
    assert again["confusion_matrix"] == summary["eval"]["test"]["confusion_matrix"]
    assert again["loss"] == pytest.approx(summary["eval"]["test"]["loss"], rel=eval_rel(summary, 1e-6))
    # the checkpoint exports what the run exported (the best weights, not its last state)
    assert main(["export", "--checkpoint", str(ckpts / "step_00000009"), "--output", str(tmp_path / "exp")]) == 0
    assert same(exported, exported_params(tmp_path / "exp"))


def test_a_resumed_run_keeps_the_best_weights_of_the_steps_before_its_checkpoint(tiny_beans, tmp_path, scripted):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(train_args(tiny_beans, straight, *BEST)) == 0
    with stopped_at_step(7):  # in epoch 3, after the epoch-2 checkpoint
        main(train_args(tiny_beans, broken, *BEST))
    assert main(train_args(tiny_beans, broken, *BEST, "--resume", "auto")) == 0  # validates epoch 3 only (0.7)
    assert same(load_file(straight / "model" / "model.safetensors"), load_file(broken / "model" / "model.safetensors"))
    assert json.loads((broken / "summary.json").read_text())["best_model"]["epoch"] == 2


def test_without_the_flag_the_last_weights_are_exported(tiny_beans, tmp_path, scripted):
    run = tmp_path / "run"
    assert main(train_args(tiny_beans, run, "--epochs", "3", "--keep_checkpoints", "0")) == 0
    exported = exported_params(run / "model")
    assert same(exported, saved(run / "checkpoints" / "step_00000009", "model", exported))
    assert "best_model" not in json.loads((run / "summary.json").read_text())


def test_early_stopping_ends_the_run_once_the_best_validation_is_patience_validations_old(
        tiny_beans, tmp_path, capsys, scripted):
    run = tmp_path / "run"
    assert main(train_args(tiny_beans, run, *BEST, "--epochs", "5", "--early_stopping_patience", "2")) == 0
    printed = capsys.readouterr().out
    assert "early stopping at epoch 4: no better validation loss in 2 validations" in printed
    assert "best model: epoch 2 (step 6), validation loss 0.5000" in printed  # epoch 5 (0.4) never ran
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["best_model"]["stopped_early"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_00000012"


@pytest.mark.parametrize("flags, phrase", [
    (("--load_best_model_at_end", "--eval_every", "0"), "--eval_every 0 with --epochs 2 runs none"),
    (("--load_best_model_at_end", "--eval_every", "3"), "--eval_every 3 with --epochs 2 runs none"),
    (("--metric_for_best_model", "f1"), "unknown --metric_for_best_model 'f1'; choose loss or accuracy"),
    (("--early_stopping_patience", "2"), "add --load_best_model_at_end"),
])
def test_a_best_model_that_cannot_be_picked_is_refused(capsys, tiny_beans, tmp_path, flags, phrase):
    fails_with(capsys, train_args(tiny_beans, tmp_path / "run", *flags), phrase)
    assert not (tmp_path / "run").exists()


def test_a_dataset_without_a_validation_split_is_refused(capsys, tmp_path):
    data = make_imagefolder(tmp_path / "data", {"train": 2, "test": 1})
    fails_with(capsys, train_args(data, tmp_path / "run", "--load_best_model_at_end"),
               "has no validation split (it has train, test)")
    assert not (tmp_path / "run").exists()


def test_a_lora_run_exports_its_best_adapters_merged(tiny_beans, tmp_path, scripted):
    """Only the adapters and the head train: they are what is kept, put back and merged into the export."""
    run, last = tmp_path / "run", tmp_path / "last"
    assert main(train_args(tiny_beans, run, *BEST, "--lora_rank", "4")) == 0
    assert main(train_args(tiny_beans, last, "--epochs", "3", "--lora_rank", "4")) == 0  # the same training
    assert json.loads((run / "summary.json").read_text())["best_model"]["epoch"] == 2
    exported = exported_params(run / "model")
    assert not same(exported, exported_params(last / "model"))
    for step in ("step_00000006", "step_00000009"):  # epoch 2's own state; the last, which exports its best
        assert main(["export", "--checkpoint", str(run / "checkpoints" / step), "--output", str(tmp_path / step)]) == 0
        assert same(exported, exported_params(tmp_path / step)), step
