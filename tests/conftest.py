"""Shared fixtures: a few real beans images per class, and tiny ViT configs."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
BEANS = REPO / "data" / "beans"
CLASSES = ("angular_leaf_spot", "bean_rust", "healthy")


def make_imagefolder(root: Path, per_class: dict[str, int]) -> Path:
    """Copy the first n real images of each class into root/split/class/."""
    for split, n in per_class.items():
        for cls in CLASSES:
            dst = root / split / cls
            dst.mkdir(parents=True, exist_ok=True)
            for src in sorted((BEANS / split / cls).iterdir())[:n]:
                shutil.copy(src, dst / src.name)
    return root


@pytest.fixture(autouse=True)
def _global_torch_settings():
    """A test that trains in-process turns TF32 on (train's default): put it back, so a later test's
    fp32 comparisons run at full precision whatever ran before it."""
    import torch
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


@pytest.fixture(scope="session")
def tiny_beans(tmp_path_factory) -> Path:
    """8 train, 3 validation, 2 test images per class (24 / 9 / 6)."""
    return make_imagefolder(tmp_path_factory.mktemp("beans"), {"train": 8, "validation": 3, "test": 2})


@pytest.fixture(scope="session")
def vit4_dir(tmp_path_factory) -> Path:
    """A 4-layer micro ViT config folder (random init with --pretrained none): room for 4 pipeline stages."""
    from transformers import ViTConfig
    d = tmp_path_factory.mktemp("vit4")
    ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(d)
    return d


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """CLI args of a seconds-long CPU run. Every epoch is checkpointed (--save_min_seconds 0), as a long run's
    would be: the resume and fault tests read those checkpoints."""
    return ["train", "--model", "vit-micro", "--dataset", str(data), "--output", str(out), "--epochs", "2",
            "-b", "8", "--lr", "1e-3", "--warmup_ratio", "0.1", "--cache_dir", str(out.parent / "cache"),
            "--log_every", "1", "--no-progress", "--save_min_seconds", "0", *extra]


def eval_rel(summary: dict, fp32: float) -> float:
    """Relative tolerance when `vitboost eval` of an export re-computes a loss the run reported: ``fp32``
    for an fp32 run; under bf16 (a GPU run) the two processes' kernels round differently (seen: 2e-4)."""
    return fp32 if summary["strategy"]["precision"] == "fp32" else 1e-3


class Stop(RuntimeError):
    """A run's crash, raised by stopped_at_step."""


@contextlib.contextmanager
def stopped_at_step(n: int):
    """The run inside stops with Stop at its step n, after that step's validation and before its checkpoint
    (the loop calls publish_finished once after every step, between the two)."""
    import vitboost.train
    publish, steps = vitboost.train.publish_finished, [0]

    def publish_or_stop() -> None:
        steps[0] += 1
        if steps[0] == n:
            raise Stop
        publish()
    vitboost.train.publish_finished = publish_or_stop
    try:
        with pytest.raises(Stop):
            yield
    finally:
        vitboost.train.publish_finished = publish
