"""How the training step is run: compiled or not, one CUDA graph or not, and why; EMA, drop-path.

The speed itself is measured on a GPU (benchmarks/step_speed.py, BENCHMARKS.md); what must hold
everywhere is that each choice is made for a stated reason, that the regularizers keep the model a
plain HF ViT, and that the EMA is what gets evaluated and exported.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import eval_rel, train_args
from vitboost.cli import main
from vitboost.config import ConfigError, TrainConfig, make_config
from vitboost.data import ImageSplit
from vitboost.model import build_model
from vitboost.parallel.plan import COMPILE_PAYS_AFTER_STEPS, make_plan, plan_step
from vitboost.regularize import EMA, DropPath, apply_drop_path


def _step_plan(device_type: str = "cuda", world: int = 1, steps: int | None = None, **cfg):
    config = TrainConfig(**cfg)
    config.validate()
    return plan_step(make_plan(config, device_type, world), config, device_type, steps)


def test_one_gpu_graphs_the_whole_step_and_compiles_only_long_runs():
    short = _step_plan(steps=COMPILE_PAYS_AFTER_STEPS - 1)
    assert short.cuda_graph and short.compile == "none"
    assert any("too short" in n for n in short.step_notes)
    long = _step_plan(steps=COMPILE_PAYS_AFTER_STEPS)
    assert long.cuda_graph and long.compile == "blocks"  # one graph that every block shares


def test_what_cannot_be_one_graph_says_why_and_sharded_layouts_compile_per_block():
    fsdp = _step_plan(world=2, steps=10**6, plugin="fsdp")
    assert not fsdp.cuda_graph and fsdp.compile == "blocks"
    assert any("communication" in n for n in fsdp.step_notes)
    accum = _step_plan(steps=10, grad_accum=2)
    assert not accum.cuda_graph and any("accumulation" in n for n in accum.step_notes)
    cpu = _step_plan(device_type="cpu", steps=10**6)
    assert (cpu.compile, cpu.cuda_graph) == ("none", False)


def test_explicit_choices_win_and_an_impossible_graph_is_one_error():
    assert _step_plan(steps=1, compile="true").compile == "blocks"
    assert _step_plan(steps=1, compile="model").compile == "model"  # the whole module, by name
    assert _step_plan(world=2, steps=1, plugin="fsdp", compile="true").compile == "blocks"
    with pytest.raises(ConfigError, match="--compile model needs the model as one module"):
        _step_plan(world=2, steps=1, plugin="fsdp", compile="model")
    assert _step_plan(steps=10**6, compile="false", cuda_graph="false").compile == "none"
    with pytest.raises(ConfigError, match="--cuda_graph true is not possible"):
        _step_plan(device_type="cpu", cuda_graph="true")
    assert not _step_plan(steps=10, plugin="torch_ddp_fp16", cuda_graph="false").cuda_graph
    assert _step_plan(steps=10, plugin="torch_ddp_fp16").cuda_graph  # loss scaling stays on the device


@pytest.mark.parametrize("given, want", [(True, "true"), (False, "false"), ("AUTO", "auto")])
def test_yaml_booleans_and_words_both_configure_compile(given, want):
    assert make_config({"compile": given}).compile == want


def test_bad_compile_value_is_refused():
    with pytest.raises(ConfigError, match="--compile must be auto, true, false, model or blocks"):
        make_config({"compile": "sometimes"})


def test_drop_path_keeps_the_hf_names_and_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    model, _ = build_model("vit-small", ["a", "b"], pretrained="none", log=lambda *a: None)
    keys = list(model.state_dict())
    assert apply_drop_path(model, 0.2) > 0
    assert list(model.state_dict()) == keys  # checkpoints and export unchanged
    rates = sorted({m.p for m in model.modules() if isinstance(m, DropPath)})
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)  # linear in depth, as timm
    drop = DropPath(0.5)
    x = torch.ones(4000, 3, 5)
    y = drop.train()(x)
    kept = (y[:, 0, 0] != 0).float()
    assert torch.all((y == 0) | (y == 2.0))  # a sample is dropped whole, the rest rescaled by 1/(1-p)
    assert 0.45 < kept.mean() < 0.55
    assert torch.equal(drop.eval()(x), x)


def test_blocks_with_different_drop_path_rates_share_one_compiled_graph():
    """Each block has its own rate; compiled per block (FSDP/TP/PP layouts), they must not each
    compile their own graph (with a float rate they did: 8 compiles, then the recompile limit
    left the deepest blocks eager)."""
    from torch._dynamo.utils import counters
    from vitboost.parallel.tensor import find_blocks
    torch.manual_seed(0)
    model, _ = build_model("vit-tiny", ["a", "b"], pretrained="none", image_size=32, log=lambda *a: None)
    apply_drop_path(model, 0.1)
    torch._dynamo.reset()
    counters.clear()
    for _, block in find_blocks(model):
        block.compile(backend="eager")
    model.train()(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_evaluation_is_compiled_only_when_the_run_evaluates_enough_batches_to_pay_for_it():
    config = TrainConfig()
    config.validate()
    plan = make_plan(config, "cuda", 1)
    few = plan_step(plan, config, "cuda", 10**6, eval_batches=41)  # the recipe: 13 validations + test
    assert few.compile == "blocks" and not few.compile_eval
    assert any("evaluation runs eagerly" in n for n in few.step_notes)
    assert plan_step(plan, config, "cuda", 10**6, eval_batches=COMPILE_PAYS_AFTER_STEPS).compile_eval
    assert plan_step(plan, config, "cuda", 10**6).compile_eval  # unknown: as for a long run
    assert not plan_step(plan, config, "cuda", 10, eval_batches=10**6).compile_eval  # nothing compiled


@pytest.mark.parametrize("compile_eval, graphs", [(False, 1), (True, 2)])
def test_an_eager_evaluation_adds_no_compiled_graph(monkeypatch, compile_eval, graphs):
    import dataclasses
    from torch._dynamo.utils import counters
    from vitboost.augment import soft_cross_entropy
    from vitboost.engine import Engine
    from vitboost.parallel.dims import ParallelDims, init_distributed
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager"))
    init_distributed("cpu")
    cfg = make_config({"model": "vit-micro", "pretrained": "none", "batch_size": 4, "compile": "true"})
    dims = ParallelDims(1)
    dims.build_mesh("cpu")
    torch.manual_seed(0)
    model, _ = build_model("vit-micro", ["a", "b", "c"], pretrained="none", log=lambda *a: None)
    plan = dataclasses.replace(plan_step(make_plan(cfg, "cpu", 1), cfg, "cpu", 10), compile_eval=compile_eval)
    assert plan.compile == "blocks"
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, cfg, dims, plan, torch.device("cpu"), soft_cross_entropy)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    engine.train_step([(x, y)])
    assert counters["stats"]["unique_graphs"] == 1  # training: one graph for every block
    engine.logits(x)
    assert counters["stats"]["unique_graphs"] == graphs  # evaluation: eval mode and no grad is a second graph
    torch._dynamo.reset()


def test_the_block_compiles_beside_the_teacher_only_in_one_unwrapped_module_on_one_gpu():
    from types import SimpleNamespace
    from vitboost.compile_ahead import applies

    def case(device="cuda", world=1, distill="hard", **cfg):
        config = TrainConfig(distillation_type=distill, **cfg)
        config.validate()
        plan = plan_step(make_plan(config, device, world), config, device, 10**5, eval_batches=41)
        dims = SimpleNamespace(tp_enabled=config.tp_size > 1, pp_enabled=config.pp_size > 1)
        return applies(plan, dims, config, device)

    assert case()  # the recipe on one GPU
    assert not case(distill="none")  # no teacher: nothing to overlap with
    assert not case(device="cpu")
    assert not case(compile="false")
    assert not case(world=2, plugin="torch_ddp")  # DDP
    assert not case(world=2, plugin="fsdp")
    assert not case(world=2, plugin="hybrid_parallel", pp_size=2)
    assert not case(world=2, plugin="gemini")  # CPU offload


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_the_graph_compiled_ahead_is_the_one_the_first_step_runs(monkeypatch, device):
    """While a teacher trains, the blocks' graph compiles in a thread on a one-block copy of the model.
    The model's blocks must then find that graph (no second compile), and the copy must leave the
    model's weights, gradients and random stream as they were."""
    from torch._dynamo.utils import counters
    from vitboost.augment import soft_cross_entropy
    from vitboost.compile_ahead import CompileAhead, compile_ahead
    from vitboost.engine import Engine
    from vitboost.parallel.dims import ParallelDims, init_distributed
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager"))
    init_distributed("cpu")
    cfg = make_config({"model": "vit-micro", "pretrained": "none", "batch_size": 4, "compile": "true",
                       "mixed_precision": "bf16" if device == "cuda" else "fp32", "drop_path": 0.1})
    dims = ParallelDims(1)
    dims.build_mesh("cpu")
    torch.manual_seed(0)
    model, _ = build_model("vit-micro", ["a", "b", "c"], pretrained="none", log=lambda *a: None)
    apply_drop_path(model, cfg.drop_path)
    plan = plan_step(make_plan(cfg, device, 1), cfg, device, 10)
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, cfg, dims, plan, torch.device(device), soft_cross_entropy)
    assert compile_ahead(engine, cfg, 32) is None  # nothing to overlap with: no teacher to train
    weights = [p.detach().clone() for p in engine.params]
    x = torch.randn(4, 3, 32, 32, device=device)
    rng = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    CompileAhead(engine.model, torch.zeros_like(x), engine.autocast).start().join()
    assert counters["stats"]["unique_graphs"] == 1 and counters["aot_autograd"]["total"] == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, engine.params))
    assert all(p.grad is None for p in engine.params)
    assert torch.equal(rng, torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state())
    engine.train_step([(x, torch.randint(0, 3, (4,), device=device))])
    assert counters["stats"]["unique_graphs"] == 1 and counters["aot_autograd"]["total"] == 1  # nothing new
    torch._dynamo.reset()


def test_ema_averages_after_each_step_and_evaluates_on_the_average():
    w = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", w)], decay=0.5)
    with torch.no_grad():
        w.fill_(1.0)
    ema.update()
    assert torch.allclose(ema.state_dict()["w"], torch.full((3,), 0.5))
    with ema.swapped():
        assert torch.allclose(w, torch.full((3,), 0.5))
    assert torch.allclose(w, torch.ones(3))  # the trained weights are back


def test_an_ema_run_exports_and_evaluates_the_average_and_resumes_bitwise(tiny_beans, tmp_path, capsys):
    from safetensors.torch import load_file
    import shutil
    flags = ("--ema", "0.9", "--drop_path", "0.1", "--epochs", "2", "--no-async_checkpoint")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(train_args(tiny_beans, full, *flags)) == 0
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000006")  # back to the end of epoch 1 (3 steps of 8)
    assert main(train_args(tiny_beans, part, *flags, "--resume", "auto")) == 0
    a, b = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    summary = json.loads((full / "summary.json").read_text())
    assert main(["eval", "--model", str(full / "model"), "--dataset", str(tiny_beans), "--split", "validation",
                 "--cache_dir", str(tmp_path / "cache"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["validation"]
    assert evaluated["confusion_matrix"] == summary["eval"]["validation"]["confusion_matrix"]
    assert evaluated["loss"] == pytest.approx(summary["eval"]["validation"]["loss"], rel=eval_rel(summary, 1e-4))


def test_a_gpu_resident_split_gives_the_same_batch_as_the_cpu_one():
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10) % 3
    idx = torch.tensor([7, 1, 4])
    got_images, got_labels = ImageSplit(images, labels).take(idx)
    assert torch.equal(got_images, images[idx]) and torch.equal(got_labels, labels[idx])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("precision, layer_decay", [("fp32", None), ("fp16", None), ("fp32", 0.5)])
def test_the_graphed_step_matches_eager_and_the_input_path_never_syncs(precision, layer_decay):
    """Also with per-layer lr groups (--layer_decay) whose lrs change every step, as the schedule
    changes them: the graph reads each group's lr from a device tensor refreshed before each replay."""
    from vitboost.augment import AugmentConfig, GpuAugment, soft_cross_entropy
    from vitboost.engine import Engine
    from vitboost.parallel.dims import ParallelDims, init_distributed

    device = torch.device("cuda", 0)
    init_distributed("cuda")
    losses = {}
    for graph in ("false", "true"):
        cfg = make_config({"model": "vit-micro", "pretrained": "none", "batch_size": 8, "compile": "false",
                           "cuda_graph": graph, "mixed_precision": precision, "tf32": False,
                           "layer_decay": layer_decay,
                           "plugin": "torch_ddp_fp16" if precision == "fp16" else "torch_ddp"})
        dims = ParallelDims(1)
        dims.build_mesh("cuda")
        torch.manual_seed(0)
        model, pre = build_model("vit-micro", ["a", "b", "c"], pretrained="none", log=lambda *a: None, device=device)
        plan = plan_step(make_plan(cfg, "cuda", 1), cfg, "cuda", 10)
        engine = Engine(model, cfg, dims, plan, device, soft_cross_entropy)
        assert (engine.graphed is not None) == (graph == "true")
        split = ImageSplit(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=device),
                           torch.randint(0, 3, (64,), device=device))
        augment = GpuAugment(AugmentConfig.preset("light"), 3, pre.mean, pre.std, seed=0, device=device)
        out = []
        for step in range(6):
            if step == 4:
                torch.cuda.set_sync_debug_mode("error")  # after capture: fetch, augment, replay never wait
            x, y = augment(*split.take(torch.arange(8) + 8 * step))
            out.append(engine.train_step([(x, y)])[0].clone())
            for group in engine.optimizer.param_groups:
                group["lr"] *= 0.8
        torch.cuda.set_sync_debug_mode("default")
        losses[graph] = torch.stack(out).cpu()
    tol = {"fp32": 1e-5, "fp16": 1e-3}[precision]  # fp16: the loss scale and skipped steps are captured too
    torch.testing.assert_close(losses["true"], losses["false"], rtol=tol, atol=tol)


def test_random_init_runs_on_the_gpu_unless_the_model_may_not_fit_there():
    from vitboost.train import init_device
    gpu = torch.device("cuda", 0)
    assert init_device(gpu, "torch_ddp") == gpu and init_device(gpu, "fsdp") == gpu
    assert init_device(gpu, "gemini") is None and init_device(gpu, "auto") is None  # auto may pick gemini
    assert init_device(torch.device("cpu"), "torch_ddp") is None
