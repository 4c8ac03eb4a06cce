"""Plugin names map to plans; `--plugin auto` picks the cheapest strategy that fits, and says why."""
from __future__ import annotations

import pytest
import torch

from vitboost.config import TrainConfig
from vitboost.parallel.plan import activation_bytes_per_image, choose_auto, make_plan

VIT_B = (768, 12, 12, 197)  # hidden, layers, heads, tokens
P_B = 86_000_000


@pytest.mark.parametrize("plugin, extra, want", [
    ("torch_ddp", {}, dict(data_parallel="ddp", zero1=False)),
    ("low_level_zero", {"zero_stage": 1}, dict(data_parallel="ddp", zero1=True)),
    ("low_level_zero", {"zero_stage": 2}, dict(data_parallel="fsdp", reshard_after_forward=False)),
    ("fsdp", {}, dict(data_parallel="fsdp", reshard_after_forward=True, cpu_offload=False)),
    ("gemini", {}, dict(data_parallel="fsdp", cpu_offload=True)),
    ("hybrid_parallel", {"pp_size": 2}, dict(data_parallel="fsdp", reshard_after_forward=False)),
])
def test_each_plugin_is_a_plan(plugin, extra, want):
    plan = make_plan(TrainConfig(plugin=plugin, **extra), "cpu", 4 if plugin == "hybrid_parallel" else 2)
    for key, value in want.items():
        assert getattr(plan, key) == value, key
    assert plan.precision == "fp32"  # auto precision on CPU


def test_activation_estimate_matches_the_measured_ddp_footprint():
    # the reference measured 11.5 GiB per GPU for ViT-B, batch 128, fp16, no checkpointing
    act = 128 * activation_bytes_per_image(*VIT_B, grad_checkpoint=False)
    assert 9 * 2**30 < act + 16 * P_B < 14 * 2**30
    assert activation_bytes_per_image(*VIT_B, True) < activation_bytes_per_image(*VIT_B, False) / 5


@pytest.mark.parametrize("free_gib, want", [(80, "torch_ddp"), (1.6, "low_level_zero"), (1.0, "fsdp"), (0.5, "gemini")])
def test_auto_picks_the_cheapest_strategy_that_fits(monkeypatch, free_gib, want):
    # ViT-B, batch 4 on 4 GPUs: DDP needs ~2.0 GiB free, ZeRO-2 ~1.1, FSDP ~0.8 (80% budget)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * 2**30), 80 * 2**30))
    plugin, why = choose_auto(TrainConfig(plugin="auto", batch_size=4), "cuda", 4, P_B, VIT_B)
    assert plugin == want and why.startswith(f"auto: {want}")


def test_auto_without_gpu_or_with_model_parallel_flags():
    assert choose_auto(TrainConfig(plugin="auto"), "cpu", 2, P_B)[0] == "torch_ddp"
    assert choose_auto(TrainConfig(plugin="auto", tp_size=2), "cuda", 2, P_B)[0] == "hybrid_parallel"
    assert make_plan(TrainConfig(plugin="auto"), "cpu", 2, P_B).plugin == "torch_ddp"


@pytest.mark.parametrize("plugin, extra, world", [
    ("torch_ddp", {}, 1), ("torch_ddp_fp16", {"mixed_precision": "bf16"}, 1),
    ("low_level_zero", {"zero_stage": 1}, 1), ("low_level_zero", {"zero_stage": 2}, 1), ("fsdp", {}, 1),
    ("hybrid_parallel", {}, 1), ("hybrid_parallel", {"pp_size": 2}, 2), ("hybrid_parallel", {"tp_size": 2}, 2),
    ("hybrid_parallel", {"tp_size": 2, "pp_size": 2}, 4),
])
def test_a_data_parallel_group_of_one_gets_no_wrapper(plugin, extra, world):
    plan = make_plan(TrainConfig(plugin=plugin, **extra), "cpu", world)
    assert plan.data_parallel == "none" and not plan.zero1


def test_gemini_keeps_its_cpu_offload_on_one_gpu():
    plan = make_plan(TrainConfig(plugin="gemini"), "cpu", 1)
    assert plan.data_parallel == "fsdp" and plan.cpu_offload


def test_fp16_runs_under_every_gpu_layout_pipeline_included():
    """fp16 under pp was refused until session 20: GradScaler makes its scale on the first scale() call, which
    only the last stage's loss makes, so stage 0 failed while stage 1 waited on NCCL. LossScale exists on every
    rank from the start (tests/test_clip.py runs the pp=2 fp16 step on 2 ranks)."""
    for extra in ({"pp_size": 2}, {"tp_size": 2}, {"tp_size": 2, "pp_size": 2}):
        world = extra.get("tp_size", 1) * extra.get("pp_size", 1)
        plan = make_plan(TrainConfig(plugin="hybrid_parallel", mixed_precision="fp16", **extra), "cuda", world)
        assert plan.precision == "fp16"
