"""Gradient clipping (vitboost.parallel.clip): the global norm, and the fused clip step.

Every step with a plain fused AdamW (gemini's offloaded one on the CPU, and every other layout's) folds
the clip factor (and fp16's loss-scale unscale and inf/nan skip) into the fused AdamW as
``grad_scale``/``found_inf``. For gemini it must give the parameters of the unfused reference
(norm, clip multiply, AdamW) on one process, with clipping active and inactive; under a loss
scale a step with an inf gradient on ONE rank is skipped on every rank and halves the scale,
and ``growth_interval`` good steps double it (torch GradScaler's schedule). All of it holds with
the norm read back over the offloaded gradients and with the norm summed as FSDP reduces them
(``ReducedGradNorm``, what the Engine uses). For the other layouts (one rank, FSDP, TP, PP) the
Engine's step must give what torch's unscale + clip + AdamW give from the same gradients.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.distributed import run_distributed
from vitboost.parallel.clip import LossScale, clip_grad_norm_, fused_clip_step, grad_norm
from vitboost.parallel.fsdp import ReducedGradNorm

STEPS, BATCH, LR, WD = 5, 8, 1e-2, 0.05
S = 2.0 ** 16


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    # odd sizes: FSDP shards dim 0 unevenly over 2 ranks (padding must not count in the norm)
    return nn.Sequential(nn.Linear(16, 33), nn.GELU(), nn.Linear(33, 17), nn.GELU(), nn.Linear(17, 4))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 16, generator=g), torch.randint(0, 4, (BATCH,), generator=g)) for _ in range(STEPS)]


def _gemini_vs_reference(max_norm: float, loss_scale: bool, inf_step: int, norm_from: str) -> dict:
    """FSDP2 + CPU offload (as gemini) with fused_clip_step on this rank's half batch, and the
    unfused single-process reference on the whole batch, side by side on every rank. ``norm_from``:
    "grads" (fused_clip_step reads the offloaded grads) or "reduce" (ReducedGradNorm)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model, ref = _model(), _model()
    mesh = init_device_mesh("cpu", (world,))
    kw = dict(mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False),
              mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))  # as apply_fsdp
    for layer in model[::2]:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    reduced = ReducedGradNorm(model, mesh) if norm_from == "reduce" else None
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, foreach=False)
    ls = LossScale(growth_interval=2) if loss_scale else None
    rec: dict = {"norms": [], "ref_norms": [], "scales": [], "skipped_equal": None}
    per = BATCH // world
    for step, (x, y) in enumerate(_batches()):
        x_rank = x[rank * per:(rank + 1) * per].clone()
        if step == inf_step:
            before = [p.full_tensor().clone() for p in params]
            if rank == 1 and reduced is not None:  # the norm is summed in backward: the inf must come from it
                x_rank[0, 0] = float("inf")
        loss = F.cross_entropy(model(x_rank), y[rank * per:(rank + 1) * per])
        (ls.scale(loss) if ls is not None else loss).backward()
        if step == inf_step and rank == 1 and reduced is None:  # one rank only: every rank must still skip
            params[2].grad.to_local().view(-1)[0] = float("inf")
        norm = fused_clip_step(opt, params, max_norm, None, ls, norm=reduced.pop() if reduced else None)
        opt.zero_grad(set_to_none=True)
        if ls is not None:
            rec["scales"].append(ls.get_scale())
        if step == inf_step:
            rec["skipped_equal"] = all(torch.equal(b, p.full_tensor()) for b, p in zip(before, params))
            rec["inf_norm"] = norm.item()
            continue
        rec["norms"].append(norm.item())
        F.cross_entropy(ref(x), y).backward()
        rec["ref_norms"].append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item())
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    rec["params"] = [p.full_tensor() for p in params]
    rec["ref_params"] = [p.detach().clone() for p in ref.parameters()]
    rec["steps"] = [opt.state[p]["step"].item() for p in params]
    return rec


NORM_FROM = pytest.mark.parametrize("norm_from", ["grads", pytest.param("reduce", marks=pytest.mark.skipif(
    not ReducedGradNorm.available(), reason="FSDP2's all-reduce hook needs torch >= 2.7"))])


@NORM_FROM
@pytest.mark.parametrize("max_norm", [0.05, float("inf")], ids=["clip_active", "clip_inactive"])
def test_gemini_fused_clip_step_matches_unfused_reference(max_norm, norm_from):
    for rec in run_distributed(_gemini_vs_reference, 2, max_norm, False, -1, norm_from):
        if max_norm < 1:
            assert min(rec["ref_norms"]) > max_norm, "clipping must be active"
        torch.testing.assert_close(rec["norms"], rec["ref_norms"], rtol=1e-5, atol=0)
        for a, b in zip(rec["params"], rec["ref_params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@NORM_FROM
def test_gemini_loss_scale_skips_inf_step_on_every_rank_and_follows_gradscaler_schedule(norm_from):
    recs = run_distributed(_gemini_vs_reference, 2, 0.05, True, 1, norm_from)
    for rec in recs:
        assert rec["skipped_equal"], "a step with an inf grad (on one rank) must leave the params as they were"
        assert rec["inf_norm"] != rec["inf_norm"] or rec["inf_norm"] == float("inf")
        # growth_interval 2: good, inf (x0.5), good, good (x2), good
        assert rec["scales"] == [S, S / 2, S / 2, S, S]
        assert rec["steps"] == [STEPS - 1] * len(rec["steps"])  # the skipped step is not counted by Adam
        torch.testing.assert_close(rec["norms"], rec["ref_norms"], rtol=1e-5, atol=0)
        for a, b in zip(rec["params"], rec["ref_params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _dtensor_fused_clip_step(device: str) -> dict:
    """fused_clip_step over DTensor parameters (Shard(0) on a one-rank mesh, as FSDP2 and TP leave them;
    no collective runs) with a plain-tensor grad_scale and a loss scale on ``device``, against the same
    step on plain tensors: torch's unscale + clip + unfused AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(device, (1,))
    ref = _model().to(device)
    params = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in ref.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, foreach=False)
    ls = LossScale(init_scale=2.0 ** 10, device=device)
    g = torch.Generator().manual_seed(2)
    rec: dict = {"norms": [], "ref_norms": []}
    for step in range(3):
        for p, q in zip(params, ref.parameters()):
            grad = torch.randn(q.shape, generator=g).to(device) * (float("inf") if step == 1 else 1.0)
            q.grad = grad.clone()
            p.grad = distribute_tensor(grad * ls.get_scale(), mesh, [Shard(0)])  # as if the loss were scaled
        rec["norms"].append(fused_clip_step(opt, params, 0.5, None, ls).item())
        opt.zero_grad(set_to_none=True)
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        rec["ref_norms"].append(total.item())
        if step != 1:  # the inf step is skipped
            ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    rec["params"] = [p.full_tensor().cpu() for p in params]
    rec["ref_params"] = [q.detach().cpu() for q in ref.parameters()]
    rec["scale"] = ls.get_scale()
    return rec


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_fused_clip_step_takes_dtensor_params_with_a_plain_grad_scale(device):
    """The Engine's step under FSDP2 and TP: DTensor params and grads, the clip factor and the loss scale
    as plain tensors beside them. Same result as plain tensors; the inf step is skipped, the scale halved."""
    rec, = run_distributed(_dtensor_fused_clip_step, 1, device)
    torch.testing.assert_close(rec["norms"], rec["ref_norms"], rtol=1e-5, atol=0)
    assert rec["norms"][1] == float("inf") and rec["scale"] == 2.0 ** 9
    for a, b in zip(rec["params"], rec["ref_params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_scale_defaults_and_state_match_torch_gradscaler():
    ours, theirs = LossScale(), torch.amp.GradScaler("cpu")
    assert ours.state_dict() == theirs.state_dict()
    for found in [0.0, 1.0] + [0.0] * 2000:
        ours.update(torch.tensor(found))
    assert ours.get_scale() == S  # halved once, then doubled after 2000 good steps
    other = LossScale()
    other.load_state_dict(ours.state_dict())
    assert other.state_dict() == ours.state_dict()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_grad_norm_and_clip_match_torch_on_plain_tensors(norm_type):
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(s)) for s in [(7, 5), (3,), (4, 4, 2), (), (1, 5, 6)]]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(a, 0.5, norm_type)
    got = clip_grad_norm_(b, 0.5, norm_type=norm_type)
    torch.testing.assert_close(got, want)
    for p, q in zip(a, b):
        torch.testing.assert_close(q.grad, p.grad)
    assert grad_norm([]).item() == 0.0


def _engine(device: str, mixed_precision: str, batch_size: int, precision: str | None = None,
            plugin: str = "gemini", keep_copy: bool = False, tp: int = 1, pp: int = 1):
    """A vit-micro Engine on this process's ranks, gemini unless told (max_grad_norm 0.01: the clip is active).
    ``precision`` overrides the plan's, past the CLI's checks (fp16 on the CPU). ``keep_copy``:
    also return a copy of the model as it was before the Engine took it."""
    import dataclasses

    import torch.distributed as dist

    from vitboost.augment import soft_cross_entropy
    from vitboost.config import TrainConfig
    from vitboost.engine import Engine
    from vitboost.model import build_model
    from vitboost.parallel.dims import ParallelDims, init_distributed
    from vitboost.parallel.plan import make_plan

    init_distributed(device)  # a no-op under run_distributed's gloo group
    world = dist.get_world_size()
    cfg = TrainConfig(model="vit-micro", pretrained="none", plugin=plugin, batch_size=batch_size,
                      mixed_precision=mixed_precision, max_grad_norm=0.01, tp_size=tp, pp_size=pp)
    dims = ParallelDims(world, tp=tp, pp=pp)
    dims.build_mesh(device)
    torch.manual_seed(0)
    model, _ = build_model("vit-micro", ["a", "b", "c"], pretrained="none", log=lambda *a: None,
                           device=torch.device("cpu"))
    plan = make_plan(cfg, device, world)
    if precision is not None:
        plan = dataclasses.replace(plan, precision=precision)
    before = copy.deepcopy(model) if keep_copy else None
    engine = Engine(model, cfg, dims, plan, torch.device(device), soft_cross_entropy)
    return (engine, before) if keep_copy else engine


def _engine_gemini_fp16() -> dict:
    """The Engine wiring: gemini + fp16 gets a LossScale and a fused AdamW; an inf grad skips the step."""
    engine = _engine("cpu", "fp32", 4, precision="fp16")
    x, y = torch.randn(4, 3, 32, 32), torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    params = engine.params
    start = [p.full_tensor().clone() for p in params]
    norm = engine.train_step([(x, y)])[1]
    moved = not all(torch.equal(a, p.full_tensor()) for a, p in zip(start, params))
    after_good = [p.full_tensor().clone() for p in params]
    engine.forward_backward(x * float("nan"), y)  # the norm is summed in backward (ReducedGradNorm)
    engine.step()
    kept = all(torch.equal(a, p.full_tensor()) for a, p in zip(after_good, params))
    return {"scaler": type(engine.scaler).__name__, "fused": engine.optimizer.defaults["fused"],
            "reduced_norm": engine.reduced_norm is not None,
            "moved": moved, "kept": kept, "scale": engine.scaler.get_scale(), "norm": norm.item()}


def test_engine_gemini_fp16_uses_the_fused_clip_step():
    rec, = run_distributed(_engine_gemini_fp16, 1)
    assert rec["scaler"] == "LossScale" and rec["fused"] and rec["reduced_norm"] == ReducedGradNorm.available()
    assert rec["moved"] and rec["kept"] and rec["scale"] == S / 2
    assert 0 < rec["norm"] < float("inf")


def _engine_vs_torch_step(precision: str, plugin: str = "torch_ddp", tp: int = 1, pp: int = 1) -> dict:
    """The Engine's step (fused_clip_step) against torch's own on a whole copy of the model on every rank,
    fed the Engine's gradients, gathered whole (from every shard and pipeline stage): GradScaler (fp16),
    clip_grad_norm_, unfused AdamW over the same param groups. Three steps with the clip active, then a
    batch of NaNs (on the last rank only, when data parallel splits the batch: every rank must still skip)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from vitboost.engine import _unwrap, param_groups

    engine, ref = _engine("cpu", "fp32", 4, precision=precision, plugin=plugin, keep_copy=True, tp=tp, pp=pp)
    cfg, world = engine.cfg, dist.get_world_size()
    dp, dp_rank = engine.dims.dp, engine.dims.mesh["dp"].get_local_rank()
    ref_opt = torch.optim.AdamW(param_groups(ref, cfg.weight_decay, cfg.lr, None, 0), lr=cfg.lr, foreach=False,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    ours = dict(_unwrap(engine.model).named_parameters())  # a pipeline stage holds some of them
    theirs = dict(ref.named_parameters())

    def whole(tensors: dict) -> dict:
        """Each tensor whole (DTensor shards gathered), from every rank's pipeline stage."""
        mine = {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for n, t in tensors.items()}
        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        return {n: t for part in parts for n, t in part.items()}

    assert whole(ours).keys() == theirs.keys()
    scaler = None
    if precision == "fp16":  # 2**8: vit-micro's fp16 forward (fp16 params under FSDP) overflows often at 2**16
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        engine.scaler.load_state_dict({**engine.scaler.state_dict(), "scale": 2.0 ** 8})
    g = torch.Generator().manual_seed(3)
    rec: dict = {"norms": [], "ref_norms": [], "scales": [], "ref_scales": [], "scaler": type(engine.scaler).__name__,
                 "fused": engine.optimizer.defaults.get("fused"), "dtensor": isinstance(engine.params[0], DTensor)}
    per = 4 // dp
    for step in range(4):
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = torch.eye(3)[torch.randint(0, 3, (4,), generator=g)]
        x, y = x[dp_rank * per:(dp_rank + 1) * per].clone(), y[dp_rank * per:(dp_rank + 1) * per]
        if step == 3 and dp_rank == dp - 1:
            x *= float("nan")
        engine.forward_backward(x, y)
        grads = whole({n: p.grad for n, p in ours.items()})
        for name, q in theirs.items():  # the same (loss-scaled, data-parallel-averaged) gradients, whole
            q.grad = grads[name]
        rec["norms"].append(engine.step().item())
        if scaler is not None:
            if scaler._scale is None:  # GradScaler.scale() would; the grads were scaled by the Engine
                scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
            scaler.unscale_(ref_opt)
        rec["ref_norms"].append(torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.max_grad_norm).item())
        if scaler is not None:
            scaler.step(ref_opt)
            scaler.update()
            rec["scales"].append(engine.scaler.get_scale())
            rec["ref_scales"].append(scaler.get_scale())
        elif step < 3:
            ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        if step < 3 or scaler is not None:
            rec.setdefault("params", []).append(whole(ours))
            rec.setdefault("ref_params", []).append({n: p.detach().clone() for n, p in theirs.items()})
    rec["world"] = world
    return rec


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("plugin, world, tp, pp", [("torch_ddp", 1, 1, 1), ("fsdp", 2, 1, 1),
                                                   ("hybrid_parallel", 2, 2, 1), ("hybrid_parallel", 2, 1, 2)],
                         ids=["one_rank", "fsdp_dp2", "tp2", "pp2"])
def test_engine_step_is_torchs_clip_then_adamw_in_one_fused_pass(precision, plugin, world, tp, pp):
    """One pass over the grads (norm, then fused AdamW with the clip, unscale and skip inside) gives what
    torch's three (unscale, clip multiply, step) give from the same gradients, skipped fp16 steps and the
    loss scale's backoff included; sharded (FSDP, TP: DTensor params) as on one rank, with no
    ShardedGradScaler: a NaN on one data-parallel rank's batch skips the step on every rank."""
    for rec in run_distributed(_engine_vs_torch_step, world, precision, plugin, tp, pp):
        assert rec["fused"] and rec["scaler"] == ("LossScale" if precision == "fp16" else "NoneType")
        assert rec["dtensor"] == (plugin == "fsdp" or tp > 1)
        finite = [n for n in rec["ref_norms"] if n == n and n != float("inf")]
        assert len(finite) >= 2 and min(finite) > 0.01 * 10, "the clip (max_grad_norm 0.01) must be active"
        torch.testing.assert_close(rec["norms"], rec["ref_norms"], rtol=1e-5, atol=0, equal_nan=True)
        for got, want in zip(rec["params"], rec["ref_params"]):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
        if precision == "fp16":  # whether a finite batch overflows depends on the CPU's fp16 kernels
            assert rec["scales"] == rec["ref_scales"], "the same steps skipped, the same scale after each"
            assert rec["scales"][3] == rec["scales"][2] / 2, "the NaN batch halves the scale"
            assert all(torch.equal(rec["params"][3][n], rec["params"][2][n]) for n in rec["params"][3]), \
                "the NaN step is skipped"


def _gemini_norms(device: str = "cuda") -> list[tuple[float, float]]:
    """(the Engine's norm, grad_norm over the offloaded grads) for three gemini bf16 steps: on CUDA
    the norm is summed in the reduce stream and read after FSDP's end of backward."""
    engine = _engine(device, "bf16", 8)
    assert engine.reduced_norm is not None
    pairs = []
    for _ in range(3):
        x = torch.randn(8, 3, 32, 32, device=device)
        y = torch.eye(3, device=device)[torch.randint(0, 3, (8,), device=device)]
        engine.forward_backward(x, y)
        want = grad_norm([p.grad for p in engine.params]).item()
        pairs.append((engine.step().item(), want))
    return pairs


@pytest.mark.skipif(not torch.cuda.is_available() or not ReducedGradNorm.available(),
                    reason="needs a CUDA GPU and torch >= 2.7")
def test_gemini_norm_summed_on_the_gpu_matches_the_offloaded_grads():
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    code = "import json; from tests.test_clip import _gemini_norms as f; print(json.dumps(f()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    pairs = json.loads(out.stdout.strip().splitlines()[-1])
    for got, want in pairs:
        assert got > 0
        assert got == pytest.approx(want, rel=1e-5)
