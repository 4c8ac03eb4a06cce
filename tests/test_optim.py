"""The optimizer: parameter groups (weight decay as timm/DeiT, layer-wise lr decay as BEiT/timm) and
the lr schedule (HF Trainer's --lr_scheduler_type and --warmup_steps).

Layer-wise decay gives the head the full lr, block i of L the lr times decay^(L - i) and the
embeddings decay^(L + 1). The groups keep their ratios through the schedule, and (test_strategies)
every strategy reproduces the single-process run with it.
"""
from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from vitboost.config import TrainConfig
from vitboost.engine import layer_id, lr_schedule, param_groups

LAYERS, LR = 4, 1e-3


@pytest.fixture(scope="module")
def vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=8, num_labels=3))


def lr_and_decay_by_name(model, groups) -> dict[str, tuple[float, float]]:
    ids = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(ids) == sum(len(g["params"]) for g in groups), "a parameter sits in two groups"
    return {n: ids[id(p)] for n, p in model.named_parameters()}


def test_no_weight_decay_on_biases_norms_position_embeddings_and_cls_token_and_one_lr_without_layer_decay(vit):
    groups = param_groups(vit, 0.05, LR)
    assert len(groups) == 2
    for name, (lr, wd) in lr_and_decay_by_name(vit, groups).items():
        assert lr == LR
        plain = name.endswith("bias") or "layernorm" in name or "position_embeddings" in name or "cls_token" in name
        assert wd == (0.0 if plain else 0.05), name


def test_layer_decay_scales_each_blocks_lr_by_its_depth_below_the_head(vit):
    decay = 0.5
    got = lr_and_decay_by_name(vit, param_groups(vit, 0.05, LR, decay, LAYERS))
    for name, (lr, wd) in got.items():
        if name.startswith("vit.embeddings."):
            want = LR * decay ** (LAYERS + 1)
        elif name.startswith("vit.layers."):  # transformers 5.x; 4.x names them vit.encoder.layer.i
            want = LR * decay ** (LAYERS - int(name.split(".")[2]))
        else:
            assert name.startswith(("vit.layernorm.", "classifier.")), name
            want = LR
        assert lr == pytest.approx(want, rel=1e-12), name
    last_block_matrix = next(n for n in got if n.startswith("vit.layers.3.") and n.endswith("proj.weight"))
    assert got[last_block_matrix] == (LR * decay, 0.05)
    assert got["vit.layers.0.layernorm_before.bias"] == (LR * decay ** 4, 0.0)


def test_layer_ids_come_from_names_every_layout_keeps():
    assert layer_id("vit.encoder.layer.2.output.dense.weight", 12) == 3  # transformers 4.x
    assert layer_id("base_model.model.vit.layers.5.attention.q_proj.lora_A.default.weight", 12) == 6  # peft
    assert layer_id("vit.embeddings.patch_embeddings.projection.weight", 12) == 0
    assert layer_id("classifier.weight", 12) == layer_id("vit.layernorm.weight", 12) == 13


def test_layer_decay_ratios_hold_through_the_schedule(vit):
    opt = torch.optim.AdamW(param_groups(vit, 0.05, LR, 0.65, LAYERS), lr=LR)
    first = [g["lr"] for g in opt.param_groups]
    sched = lr_schedule(opt, total_steps=10, warmup=3)
    for _ in range(6):
        opt.step()
        sched.step()
        factor = opt.param_groups[0]["lr"] / first[0]
        assert 0 < factor <= 1
        torch.testing.assert_close([g["lr"] for g in opt.param_groups], [lr * factor for lr in first])


def lrs(kind: str, total: int = 10, warmup: int = 4) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, total, warmup, kind)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind, after_warmup", [
    ("cosine", [1.0, 0.9330, 0.75, 0.5, 0.25, 0.0670]),  # 0.5 (1 + cos(pi t)), t = 0, 1/6 .. 5/6
    ("linear", [1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
    ("constant_with_warmup", [1.0] * 6),
])
def test_warmup_rises_linearly_to_the_peak_then_the_schedule_decays(kind, after_warmup):
    got = lrs(kind)
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert got[4:] == pytest.approx(after_warmup, abs=1e-4)


def test_constant_has_no_warmup_as_in_hf():
    assert lrs("constant") == [1.0] * 10


def test_warmup_steps_replace_the_ratio_and_bad_values_are_refused():
    assert TrainConfig(warmup_ratio=0.3).warmup(100) == 30
    assert TrainConfig(warmup_ratio=0.3, warmup_steps=7).warmup(100) == 7
    from vitboost.config import ConfigError
    with pytest.raises(ConfigError, match="--lr_scheduler_type 'cosin'; choose one of cosine, linear"):
        TrainConfig(lr_scheduler_type="cosin").validate()
    with pytest.raises(ConfigError, match="--warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-1).validate()


@pytest.mark.parametrize("plugin", ["torch_ddp", "gemini"])  # gemini: the fused CPU step reads them from the groups
def test_adam_betas_and_epsilon_reach_the_optimizer(tiny_beans, tmp_path, monkeypatch, plugin):
    from tests.conftest import train_args
    from vitboost.cli import main
    built = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            built.append(self)
    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    flags = ("--adam_beta1", "0.8", "--adam_beta2", "0.95", "--adam_epsilon", "1e-6", "--plugin", plugin, "--epochs", "1")
    assert main(train_args(tiny_beans, tmp_path / "run", *flags)) == 0
    assert built and all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in built[-1].param_groups)


@pytest.mark.parametrize("flag, value", [("--adam_beta2", "1.0"), ("--adam_epsilon", "0")])
def test_bad_adam_settings_are_refused(capsys, tiny_beans, tmp_path, flag, value):
    from tests.conftest import train_args
    from tests.test_cli_errors import fails_with
    fails_with(capsys, train_args(tiny_beans, tmp_path / "run", flag, value), f"{flag} must be")
