"""Distillation from a convnet teacher (DeiT, class token only): the targets, the run, the resume.

Whether it pays is measured on a GPU (benchmarks/recipe_sweep.py, BENCHMARKS.md); here: the
student's targets are exactly (1 - alpha) * labels + alpha * teacher, the student stays a plain
HF ViT, the teacher is trained once and reloaded on resume, and bad teacher options fail in one line.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.conftest import train_args
from tests.test_cli_errors import fails_with
from vitboost.cli import main
from vitboost.distill import Distiller


class FixedTeacher(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.out = logits

    def forward(self, pixel_values):
        return type("Out", (), {"logits": self.out})()


def identity(images, labels, groups=1):
    return images, labels


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_targets_mix_the_labels_with_the_teachers_predictions(kind):
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.5, 3.0]])
    taught = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]) if kind == "hard" else logits.softmax(-1)
    distill = Distiller(identity, FixedTeacher(logits), kind, alpha=0.25)
    x = torch.zeros(2, 3, 4, 4)
    _, ids = distill(x, torch.tensor([1, 1]))  # class ids (no mixup) become one-hot first
    torch.testing.assert_close(ids, 0.75 * torch.tensor([[0, 1.0, 0], [0, 1.0, 0]]) + 0.25 * taught)
    mixed = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])  # mixup/cutmix targets stay soft
    _, soft = distill(x, mixed)
    torch.testing.assert_close(soft, 0.75 * mixed + 0.25 * taught)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2))


def test_a_distilled_run_trains_its_teacher_once_and_exports_a_plain_vit(tiny_beans, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_beans, out, "--distillation_type", "hard", "--teacher_model", "resnet-tiny",
                      "--teacher_epochs", "1", "--augment", "light")
    assert main([*args, "--max_steps", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["model"] == "resnet-tiny" and "trained" in summary["teacher"]["source"]
    assert 0 <= summary["teacher"]["validation_accuracy"] <= 1 and "teacher" in summary["timings_s"]
    assert json.loads((out / "teacher" / "config.json").read_text())["model_type"] == "resnet"
    assert (out / "teacher" / "preprocessor_config.json").is_file()  # loads in transformers.pipeline too
    assert json.loads((out / "model" / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    assert main([*args, "--resume", "auto"]) == 0  # picks up at step 3 with the teacher it saved
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["source"].startswith("loaded from") and summary["steps"] > 3


def test_a_teacher_folder_is_used_as_given(tiny_beans, tmp_path):
    first = tmp_path / "first"
    assert main([*train_args(tiny_beans, first, "--distillation_type", "soft", "--teacher_model", "resnet-tiny",
                             "--teacher_epochs", "1", "--max_steps", "1")]) == 0
    out = tmp_path / "second"
    assert main([*train_args(tiny_beans, out, "--distillation_type", "soft", "--teacher_model",
                             str(first / "teacher"), "--max_steps", "2")]) == 0
    assert json.loads((out / "summary.json").read_text())["teacher"]["source"] == "loaded"


@pytest.mark.parametrize("flags, phrase", [
    (["--distillation_type", "hard", "--teacher_model", "/no/such/teacher"], "named teacher"),
    (["--distillation_type", "hard", "--distillation_alpha", "0"], "--distillation_alpha"),
    (["--distillation_type", "kl"], "invalid choice"),
    (["--distillation_type", "hard", "--stream"], "drop --stream"),
])
def test_bad_distillation_options_fail_in_one_line(capsys, tiny_beans, tmp_path, flags, phrase):
    fails_with(capsys, train_args(tiny_beans, tmp_path / "run", *flags), phrase)
    assert not (tmp_path / "run").exists()


def test_distillation_under_pipeline_parallel_reproduces_one_process(tiny_beans, vit4_dir, tmp_path):
    """run_demo's 2-GPU layout (pp=2) with the distilled recipe: same teacher, losses and weights as one process."""
    from tests.distributed import run_distributed
    from tests.test_lora import _train_each
    from tests.test_strategies import assert_same, base
    distill = {"distillation_type": "hard", "teacher_model": "resnet-tiny", "teacher_epochs": 1, "augment": "light"}
    ref, pp = tmp_path / "ref" / "run", tmp_path / "pp" / "run"
    run_distributed(_train_each, 1, [base(tiny_beans, vit4_dir, ref, **distill)])
    run_distributed(_train_each, 2, [base(tiny_beans, vit4_dir, pp, plugin="hybrid_parallel", pp_size=2, **distill)])
    assert_same(ref, pp)
    teachers = [json.loads((run / "summary.json").read_text())["teacher"] for run in (ref, pp)]
    assert teachers[0]["validation_accuracy"] == teachers[1]["validation_accuracy"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_teacher_trains_as_one_graph_and_distilled_chunks_never_wait_for_the_device():
    from vitboost.augment import AugmentConfig, GpuAugment
    from vitboost.batches import TrainBatches
    from vitboost.config import TrainConfig
    from vitboost.data import ImageSplit
    from vitboost.distill import _named, _train

    device = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(0)
    split = ImageSplit(torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8).to(device),
                       (torch.arange(64) % 3).to(device))
    mean, std = (0.5,) * 3, (0.25,) * 3
    teacher = _named("resnet-tiny", 3, device, seed=0)
    before = [p.detach().clone() for p in teacher.parameters()]
    _train(teacher, split, 3, mean, std, TrainConfig(batch_size=16, teacher_epochs=4, seed=0), device)
    after = list(teacher.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(after, before))  # the replayed graph did update every weight
    augment = GpuAugment(AugmentConfig.preset("strong"), 3, mean, std, seed=0, device=device)
    batches = TrainBatches(split, augment, Distiller(augment, teacher, "hard", 0.5), global_batch=16, per_epoch=4,
                           dp=1, dp_rank=0, seed=0, image_size=32, device=device)
    list(batches.epoch(0))  # the first chunk uploads constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [y for epoch in (1, 2) for _, y in batches.epoch(epoch)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(got) == 8
    for y in got:
        torch.testing.assert_close(y.sum(1), torch.ones(16, device=device))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_work_beside_the_teacher_starts_once_its_step_is_captured(monkeypatch, device):
    """The student's compile runs beside the teacher's training, but never beside its CUDA-graph capture:
    a draw from the device's generator in another thread during the capture breaks it ("Offset increment
    outside graph capture", BENCHMARKS.md section 23). So it starts once, after the capture."""
    from vitboost.config import TrainConfig
    from vitboost.cuda_graph import GraphedStep
    from vitboost.data import ImageSplit
    from vitboost.distill import _named, _train

    captured, seen = [], []
    capture = GraphedStep._capture
    monkeypatch.setattr(GraphedStep, "_capture", lambda self, x, y: (capture(self, x, y), captured.append(1))[0])
    dev = torch.device(device)
    split = ImageSplit(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=dev),
                       (torch.arange(64) % 3).to(dev))
    teacher = _named("resnet-tiny", 3, dev, seed=0)
    _train(teacher, split, 3, (0.5,) * 3, (0.25,) * 3, TrainConfig(batch_size=16, teacher_epochs=2, seed=0), dev,
           beside=lambda: seen.append(len(captured)))
    assert seen == ([1] if device == "cuda" else [0])  # once; on a GPU after the capture
