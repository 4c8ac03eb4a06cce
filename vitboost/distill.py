"""Distillation from a convnet teacher (DeiT), trained first in the same run.

A ViT trained from scratch on a thousand images lacks the locality a convnet has built in; DeiT
showed that a convnet teacher's predictions hand it over. Here the teacher is a small
`transformers` ResNet (random init, trained for ``--teacher_epochs`` on the same split with
light augmentation) or any HF image classifier folder given by ``--teacher_model``. The student
stays a plain `ViTForImageClassification` (class token only, no distillation token): its
targets become

    (1 - alpha) * targets + alpha * teacher(x)        teacher(x): one-hot argmax (hard) or softmax (soft)

on the very images the student sees (augmented, mixed), which is DeiT's loss with one head,
since cross-entropy is linear in its target. The loop does not change: ``Distiller`` wraps the
augmentation and returns (images, targets) like it. The trained teacher is saved in
``<output>/teacher`` and a resumed run loads it from there instead of training it again.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import AugmentConfig, GpuAugment, soft_cross_entropy
from .config import ConfigError, TrainConfig
from .data import ImageSplit, num_batches
from .evaluate import evaluate
from .model import Preprocess, export_pretrained
from .predict import OnDevice, forward_logits

# named teachers: transformers ResNetConfig fields (basic blocks), smallest first
TEACHERS = {
    "resnet-tiny": dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
    "resnet-small": dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]),
    "resnet-18": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2]),
}
TEACHER_LR = 2e-3  # AdamW, cosine, 5% warm-up: a from-scratch convnet on small data (BENCHMARKS.md section 19)


class Distiller:
    """augment(images, labels) -> (images, targets mixed with the teacher's predictions)."""

    def __init__(self, augment: GpuAugment, teacher: nn.Module, kind: str, alpha: float):
        self.augment, self.teacher, self.kind, self.alpha = augment, teacher.eval(), kind, alpha

    def __call__(self, images: Tensor, labels: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
        x, y = self.augment(images, labels, groups=groups)
        return x, self.targets(x, y)

    @torch.no_grad()
    def targets(self, x: Tensor, y: Tensor) -> Tensor:
        logits = _logits(self.teacher, x)
        k = logits.shape[-1]
        taught = F.one_hot(logits.argmax(-1), k).float() if self.kind == "hard" else logits.softmax(-1)
        y = y.float() if y.is_floating_point() else F.one_hot(y, k).float()
        return (1 - self.alpha) * y + self.alpha * taught


def make_distiller(cfg: TrainConfig, augment: GpuAugment, split, eval_splits: dict,
                   label_names: list[str], pre: Preprocess, device: torch.device,
                   out: Path, is_main: bool, say, beside: Callable[[], None] | None = None,
                   ) -> tuple[Distiller | None, dict | None]:
    """The teacher (loaded, or trained now) wrapped around ``augment``; (None, None) without distillation.
    beside: started once the teacher's training step is captured as a CUDA graph (at once when the teacher
    is loaded), to run beside the rest of its training: a draw from the device's random generator in
    another thread during the capture breaks it (other GPU work there is fine: capture_error_mode="thread_local")."""
    beside = beside or (lambda: None)
    if cfg.distillation_type == "none":
        return None, None
    if not isinstance(split, ImageSplit):
        raise ConfigError("--distillation_type needs the decoded image cache, which does not fit in memory here; "
                          "use a smaller --image_size")
    mean, std = pre.mean, pre.std
    t0 = time.perf_counter()
    saved = out / "teacher"
    info: dict = {"model": cfg.teacher_model}
    if (saved / "config.json").is_file() and cfg.resume:  # resumed: the teacher this run trained
        beside()
        teacher, info["source"] = _load(saved, label_names, device), f"loaded from {saved}"
    elif cfg.teacher_model in TEACHERS:
        teacher = _named(cfg.teacher_model, len(label_names), device, cfg.seed)
        _train(teacher, split, len(label_names), mean, std, cfg, device, beside)
        info["source"] = f"trained {cfg.teacher_epochs} epochs here"
        if is_main:  # with the student's preprocessing: loads in transformers.pipeline, or as --teacher_model
            export_pretrained(teacher, pre, saved)
    else:
        beside()
        teacher, info["source"] = _load(Path(cfg.teacher_model), label_names, device), "loaded"
    for name in ("validation", "test"):  # reported, never used to choose anything
        if name in eval_splits:
            m = evaluate(OnDevice(teacher, device), eval_splits[name], label_names,
                         batch_size=cfg.eval_batch_size, mean=mean, std=std)
            info[f"{name}_accuracy"] = round(m["accuracy"], 4)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    scores = ", ".join(f"{k.split('_')[0]} {v}" for k, v in info.items() if k.endswith("_accuracy")) or "no eval split"
    say(f"teacher: {cfg.teacher_model} ({info['source']}, {info['seconds']:.1f} s), accuracy {scores}; "
        f"{cfg.distillation_type} distillation, alpha {cfg.distillation_alpha}")
    return Distiller(augment, teacher, cfg.distillation_type, cfg.distillation_alpha), info


def check_teacher(cfg: TrainConfig) -> None:
    """Fail before any work when the teacher cannot be had."""
    if cfg.distillation_type == "none":
        return
    if cfg.stream:
        raise ConfigError("--distillation_type needs the decoded image cache; drop --stream")
    if cfg.teacher_model in TEACHERS:
        return
    if not (Path(cfg.teacher_model) / "config.json").is_file():
        raise ConfigError(f"--teacher_model {cfg.teacher_model} is neither a named teacher ({', '.join(TEACHERS)}) "
                          f"nor a folder with a config.json; pass one of those")


def _named(name: str, num_labels: int, device: torch.device, seed: int) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(seed + 1)  # same teacher on every rank, independent of the student's init
    config = ResNetConfig(layer_type="basic", num_labels=num_labels, **TEACHERS[name])
    return ResNetForImageClassification(config).to(device, memory_format=torch.channels_last)


def _load(folder: Path, label_names: list[str], device: torch.device) -> nn.Module:
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(folder)
    names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    named = not all(n.startswith("LABEL_") for n in names)  # HF's placeholder names say nothing
    if len(names) != len(label_names) or named and [n.lower() for n in names] != [n.lower() for n in label_names]:
        raise ConfigError(f"--teacher_model {folder} predicts {names}, not this dataset's {label_names}; "
                          f"pass a teacher trained on the same labels")
    return model.to(device)


def _train(teacher: nn.Module, split: ImageSplit, num_labels: int, mean, std, cfg: TrainConfig,
           device: torch.device, beside: Callable[[], None] | None = None) -> None:
    """A plain loop, the same on every rank (same seed, same batches), then rank 0's weights everywhere.
    On a GPU its step is one CUDA graph and its batches come a chunk at a time, like the student's:
    a small convnet's step is bound by the host too."""
    from .batches import TrainBatches
    from .cuda_graph import GraphedStep
    from .engine import lr_schedule
    seed = cfg.seed + 7919
    augment = GpuAugment(AugmentConfig.preset("light").with_(label_smoothing=0.1), num_labels, mean, std,
                         seed=seed, device=device)
    batch = min(cfg.batch_size, len(split))
    steps = num_batches(len(split), batch, drop_last=True)
    batches = TrainBatches(split, augment, global_batch=batch, per_epoch=steps, dp=1, dp_rank=0, seed=seed,
                           image_size=split.images.shape[-1], device=device)
    opt = torch.optim.AdamW(teacher.parameters(), lr=TEACHER_LR, weight_decay=0.05, fused=device.type == "cuda")
    total = cfg.teacher_epochs * steps
    schedule = lr_schedule(opt, total, int(total * 0.05))

    def one_step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = soft_cross_entropy(_logits(teacher, x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), loss.detach()

    step = GraphedStep(one_step, opt) if device.type == "cuda" else one_step
    teacher.train()
    for epoch in range(cfg.teacher_epochs):
        for x, y in batches.epoch(epoch):
            step(x, y)
            schedule.step()
            if beside is not None and getattr(step, "graph", True) is not None:  # captured, or never will be
                beside()
                beside = None
    if beside is not None:
        beside()
    teacher.eval()
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in teacher.state_dict().values():
            dist.broadcast(t, src=0)


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    """The teacher's fp32 logits (bf16 on a GPU whatever the student's precision: fp16 would need a
    loss scale), its input in the channels-last layout its weights have."""
    return forward_logits(model, x.contiguous(memory_format=torch.channels_last))
