"""The guarantee: a strategy changes speed and memory, never the result.

Every strategy and layout trains the same 4-layer micro ViT on the same global batches
(CPU, gloo, fp32, fixed seed) and must reproduce the single-process run: each logged
step's loss and every final parameter within 1e-5 relative, and identical eval metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import run_distributed
from vitboost.config import TrainConfig

RTOL = 2e-5  # pp2_dp2 on a 16-core Xeon: one weight 1.1e-5 apart after 5 steps (AVX-512 kernels' rounding)
GLOBAL_BATCH = 8
# Attention key biases get an exactly-zero true gradient (softmax ignores a constant shift),
# so Adam updates them from float rounding noise alone: they are checked to stay at noise
# level (absolute 1e-5) instead of relative to their own ~1e-6 size.
ZERO_GRAD = ("key.bias", "k_proj.bias")
# Adam divides each update by sqrt(v): an element whose gradient nearly cancels over the batch turns fp32
# summation-order noise (microbatches against one batch) into drift whatever the tensor's size, so small
# tensors (biases) get an absolute floor. Seen: one element of layer 0's MLP bias 1.1e-6 apart under pp=2
# (1.4e-6 once the last block computes the CLS token only, which sums in another order), every other
# weight below 0.15 of its bound; tests/test_pipeline.py saw such elements up to 1e-5 apart. A real
# difference (another batch, a missed gradient) moves weights by ~lr = 1e-3 per step, 100x this floor.
ATOL = 1e-5


def assert_params_close(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """Per tensor: ||other - ref|| <= RTOL * ||ref|| + ATOL (relative error in norm, as fp32 rounding allows)."""
    assert ref.keys() == other.keys()
    for k, a in ref.items():
        err = (other[k] - a).norm().item()
        bound = 1e-5 * a.numel() ** 0.5 if k.endswith(ZERO_GRAD) else RTOL * a.norm().item() + ATOL
        assert err <= bound, f"{k}: ||diff|| {err:.3g} > {bound:.3g}"


def _train(overrides: dict) -> None:
    from vitboost.train import train
    train(TrainConfig(**overrides))


def base(data: Path, model: Path, out: Path, **kw) -> dict:
    return {"model": str(model), "pretrained": "none", "dataset": str(data), "output": str(out),
            "cache_dir": str(out.parent / "cache"), "epochs": 2, "max_steps": 5, "batch_size": GLOBAL_BATCH,
            "lr": 1e-3, "warmup_ratio": 0.2, "seed": 7, "log_every": 1, "progress": False,
            "eval_batch_size": 4, "mixed_precision": "fp32", "device": "cpu", "save_min_seconds": 0, **kw}


def result(out: Path) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses, load_file(out / "model" / "model.safetensors"), json.loads((out / "summary.json").read_text())


def assert_same(ref: Path, other: Path) -> None:
    l0, w0, s0 = result(ref)
    l1, w1, s1 = result(other)
    assert len(l0) == len(l1) == 5
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=RTOL, atol=0)
    assert_params_close(w0, w1)
    for split in ("validation", "test"):
        assert s1["eval"][split]["num_samples"] == s0["eval"][split]["num_samples"]
        assert s1["eval"][split]["confusion_matrix"] == s0["eval"][split]["confusion_matrix"]
        assert abs(s1["eval"][split]["loss"] - s0["eval"][split]["loss"]) < 1e-5


def one_process(factory, data: Path, model: Path, **kw) -> Path:
    """A module fixture's reference: the run in one process."""
    out = factory.mktemp("ref") / "run"
    run_distributed(_train, 1, base(data, model, out, **kw))
    return out


def under_layout(name: str, data: Path, model: Path, out: Path, **kw) -> Path:
    """The same run under CASES[name]'s processes and strategy."""
    procs, overrides = CASES[name]
    run_distributed(_train, procs, base(data, model, out, **kw, **overrides))
    return out


@pytest.fixture(scope="module")
def reference(tiny_beans, vit4_dir, tmp_path_factory) -> Path:
    return one_process(tmp_path_factory, tiny_beans, vit4_dir)


CASES = {
    # name: (processes, overrides); batch_size is per data-parallel rank
    "torch_ddp": (2, {"plugin": "torch_ddp", "batch_size": 4}),
    "zero1": (2, {"plugin": "low_level_zero", "zero_stage": 1, "batch_size": 4}),
    "zero2": (2, {"plugin": "low_level_zero", "zero_stage": 2, "batch_size": 4}),
    "fsdp": (2, {"plugin": "fsdp", "batch_size": 4}),
    "gemini": (2, {"plugin": "gemini", "batch_size": 4}),
    "tp2": (2, {"plugin": "hybrid_parallel", "tp_size": 2}),
    "pp2_1f1b": (2, {"plugin": "hybrid_parallel", "pp_size": 2}),
    "pp2_gpipe": (2, {"plugin": "hybrid_parallel", "pp_size": 2, "pp_schedule": "GPipe"}),
    "pp2_interleaved": (2, {"plugin": "hybrid_parallel", "pp_size": 2, "pp_schedule": "Interleaved1F1B"}),
    "tp2_pp2": (4, {"plugin": "hybrid_parallel", "tp_size": 2, "pp_size": 2}),
    "pp2_dp2": (4, {"plugin": "hybrid_parallel", "pp_size": 2, "batch_size": 4}),
    "tp2_dp2": (4, {"plugin": "hybrid_parallel", "tp_size": 2, "batch_size": 4}),
    "grad_accum": (1, {"batch_size": 4, "grad_accum": 2}),
    # gemini's norm is summed as FSDP reduces: once per step, after the last micro-batch
    "gemini_grad_accum": (2, {"plugin": "gemini", "batch_size": 2, "grad_accum": 2}),
    "grad_checkpoint_fsdp": (2, {"plugin": "fsdp", "batch_size": 4, "grad_checkpoint": True}),
}


@pytest.mark.parametrize("name", CASES)
def test_strategy_reproduces_single_process(name, reference, tiny_beans, vit4_dir, tmp_path):
    assert_same(reference, under_layout(name, tiny_beans, vit4_dir, tmp_path / "run"))


@pytest.fixture(scope="module")
def ema_reference(tiny_beans, vit4_dir, tmp_path_factory) -> Path:
    return one_process(tmp_path_factory, tiny_beans, vit4_dir, ema=0.9)


@pytest.mark.parametrize("name", ["fsdp", "tp2"])
def test_weight_ema_under_sharded_layouts_reproduces_single_process(name, ema_reference, tiny_beans, vit4_dir,
                                                                   tmp_path):
    """The EMA (evaluated and exported in place of the raw weights) averages DTensor shards under
    FSDP/TP exactly as it averages whole tensors in one process."""
    out = under_layout(name, tiny_beans, vit4_dir, tmp_path / "run", ema=0.9)
    assert_same(ema_reference, out)


@pytest.fixture(scope="module")
def layer_decay_reference(tiny_beans, vit4_dir, tmp_path_factory) -> Path:
    return one_process(tmp_path_factory, tiny_beans, vit4_dir, layer_decay=0.5)


@pytest.mark.parametrize("name", ["zero1", "pp2_1f1b", "tp2"])
def test_layer_decay_reproduces_single_process(name, layer_decay_reference, reference, tiny_beans, vit4_dir,
                                               tmp_path):
    """Per-layer lr groups, built from the names each rank holds (a pipeline stage holds some blocks, ZeRO
    partitions each group), give the one-process run; and that run is not the one without layer decay."""
    out = under_layout(name, tiny_beans, vit4_dir, tmp_path / "run", layer_decay=0.5)
    assert_same(layer_decay_reference, out)
    with pytest.raises(AssertionError):
        assert_params_close(result(reference)[1], result(out)[1])


@pytest.mark.parametrize("layer_decay", [None, 0.5], ids=["one_lr", "layer_decay"])
def test_checkpoint_saved_under_pp2_resumes_in_one_process(layer_decay, tiny_beans, vit4_dir, tmp_path):
    """Save with pipeline parallel on 2 ranks (each holding half the blocks and their Adam
    states), resume the second epoch on one process: same as never switching layout. Under
    --layer_decay the checkpoint's rank 0 held only its own layers' lr groups."""
    one = tmp_path / "one"
    run_distributed(_train, 1, base(tiny_beans, vit4_dir, one, epochs=1, max_steps=None, layer_decay=layer_decay))
    run_distributed(_train, 1, base(tiny_beans, vit4_dir, one, epochs=2, max_steps=None, resume="auto",
                                    layer_decay=layer_decay))
    switched = tmp_path / "switched"
    run_distributed(_train, 2, base(tiny_beans, vit4_dir, switched, epochs=1, max_steps=None,
                                    plugin="hybrid_parallel", pp_size=2, layer_decay=layer_decay))
    run_distributed(_train, 1, base(tiny_beans, vit4_dir, switched, epochs=2, max_steps=None, resume="auto",
                                    layer_decay=layer_decay))
    assert_params_close(load_file(one / "model" / "model.safetensors"),
                        load_file(switched / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def steps_reference(tiny_beans, vit4_dir, tmp_path_factory) -> Path:
    return one_process(tmp_path_factory, tiny_beans, vit4_dir, eval_steps=2)


@pytest.mark.parametrize("name", ["fsdp", "pp2_1f1b"])
def test_step_validations_under_sharded_layouts_match_one_process(name, steps_reference, tiny_beans, vit4_dir,
                                                                   tmp_path):
    """--eval_steps validates mid-epoch, between steps: FSDP's ranks each take their share of the
    validation, a pipeline's stages run it together, and the run goes on as one process does."""
    out = under_layout(name, tiny_beans, vit4_dir, tmp_path / "run", eval_steps=2)
    assert_same(steps_reference, out)
    h0, h1 = result(steps_reference)[2]["history"], result(out)[2]["history"]
    assert [h["step"] for h in h1] == [h["step"] for h in h0] == [2, 3, 4]  # steps 2 and 4; epoch 1 ends at 3
    assert [h["val_loss"] for h in h1] == pytest.approx([h["val_loss"] for h in h0], abs=1e-5)


@pytest.fixture(scope="module")
def best_reference(tiny_beans, vit4_dir, tmp_path_factory) -> Path:
    return one_process(tmp_path_factory, tiny_beans, vit4_dir, load_best_model_at_end=True)


@pytest.mark.parametrize("name", ["zero2", "fsdp", "pp2_1f1b"])
def test_best_model_under_sharded_layouts_reproduces_single_process(name, best_reference, reference, tiny_beans,
                                                                    vit4_dir, tmp_path):
    """--load_best_model_at_end keeps each rank's own pieces of the best weights (FSDP shards, a pipeline
    stage's blocks; ZeRO-2's parameters are unsharded between forward and backward) and puts them back
    for the test evaluation and the export: as one process does. The run validates once (epoch 1 of
    max_steps 5), so the best weights are step 3's, not the last step's that the reference exports."""
    out = under_layout(name, tiny_beans, vit4_dir, tmp_path / "run", load_best_model_at_end=True)
    assert_same(best_reference, out)
    assert result(out)[2]["best_model"]["step"] == 3
    with pytest.raises(AssertionError):
        assert_params_close(result(reference)[1], result(out)[1])
