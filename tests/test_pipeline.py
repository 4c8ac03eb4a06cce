"""Pipeline parallel == one process: same losses, same parameters, same logits.

gloo CPU processes, a 4-block tiny ViT in fp32 with dropout 0. Each layout (pp=2
1F1B / GPipe / Interleaved1F1B, and dp=2 x pp=2 with FSDP2) is trained for a few
AdamW steps with grad clipping active (max_norm below the gradient norm, so a
norm that missed a pp rank would change every step).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

from tests.distributed import run_distributed  # noqa: E402
from vitboost.parallel.clip import clip_grad_norm_  # noqa: E402
from vitboost.parallel.pipeline import PipelineRunner, split_model  # noqa: E402
from vitboost.parallel.tensor import find_blocks  # noqa: E402

STEPS, BATCH, LR, MAX_NORM = 5, 8, 1e-3, 0.5
RTOL, ATOL = 1e-5, 1e-6
# Final params: Adam's first steps are ~lr*sign(grad), so an element whose gradient nearly
# cancels over the batch turns fp32 summation-order noise (microbatches vs one batch) into
# steps of up to ~1e-5 (seen: <1e-5, mean 6e-9). 5% of lr still catches any real mismatch;
# losses, clip norms and grads (where scale errors would show) are held to 1e-5 relative.
PARAM_ATOL = 5e-2 * LR


def tiny_vit(num_layers: int = 4) -> ViTForImageClassification:
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                    intermediate_size=128, image_size=32, patch_size=8, num_labels=3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg).float()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(STEPS)]


def odd_images() -> torch.Tensor:
    return torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(runner: PipelineRunner, part, pp_group, dp_rank: int = 0, dp_size: int = 1) -> dict:
    """AdamW steps; records losses, clip norms, the clipped grads of step 0 and final params."""
    opt = torch.optim.AdamW(part.parameters(), lr=LR, weight_decay=0.05)
    rec: dict = {"losses": [], "norms": []}
    per = BATCH // dp_size
    for x, y in batches():
        opt.zero_grad()
        rec["losses"].append(runner.step(x[dp_rank * per:(dp_rank + 1) * per],
                                         y[dp_rank * per:(dp_rank + 1) * per]).item())
        rec["norms"].append(clip_grad_norm_(part.parameters(), MAX_NORM, pp_group).item())
        rec.setdefault("grads", {k: _full(p.grad) for k, p in part.named_parameters()})
        opt.step()
    rec["state"] = {k: _full(v) for k, v in part.state_dict().items()}
    return rec


# ----------------------------------------------------------------------------- rank functions

def _pp2(rank: int, group) -> dict:
    """pp=2: 1F1B, GPipe, Interleaved1F1B (2 stages/rank), eval on an odd batch, errors, autocast."""
    cpu = torch.device("cpu")
    out: dict = {}
    for name, spr, n_mb in [("1F1B", 1, 2), ("GPipe", 1, 4), ("Interleaved1F1B", 2, 4)]:
        part, specs = split_model(tiny_vit(), rank, 2, stages_per_rank=spr)
        runner = PipelineRunner(part, specs, group, cpu, n_mb, schedule=name)
        before = runner.forward(odd_images())
        out[name] = _train(runner, part, group)
        out[name].update(before=before, after=runner.forward(odd_images()))
        if name == "1F1B":
            x, y = batches()[0]
            with pytest.raises(ValueError, match="equal microbatches"):
                runner.step(x[:7], y[:7])
            with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
                runner.step(x, y)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out["autocast_loss"] = runner.step(x, y).item()
                out["autocast_logits"] = runner.forward(odd_images())
            part.zero_grad()
        if name == "GPipe":  # soft targets reach loss_fn untouched; two steps accumulate grads
            full = tiny_vit()
            part2, specs2 = split_model(tiny_vit(), rank, 2)
            soft = torch.softmax(torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(3)), -1)
            runner2 = PipelineRunner(part2, specs2, group, cpu, 4, "GPipe")
            loss = [runner2.step(batches()[0][0], soft) for _ in range(2)][0]
            ref = F.cross_entropy(full(batches()[0][0]).logits, soft)
            (2 * ref).backward()
            ref_grads = dict(full.named_parameters())
            out["soft"] = (loss.item(), ref.item(),
                           max((p.grad - ref_grads[k].grad).abs().max().item() for k, p in part2.named_parameters()))
    return out


def _dp2_pp2(mesh, dp_rank: int, pp_rank: int) -> dict:
    """dp=2 x pp=2 with FSDP2 on the blocks and the model part, each dp rank on half the batch."""
    from torch.distributed.fsdp import fully_shard
    out: dict = {}
    for name, spr, n_mb in [("1F1B", 1, 2), ("Interleaved1F1B", 2, 2)]:
        part, specs = split_model(tiny_vit(), pp_rank, 2, stages_per_rank=spr)
        for _, block in find_blocks(part):
            fully_shard(block, mesh=mesh["dp"], reshard_after_forward=False)
        fully_shard(part, mesh=mesh["dp"], reshard_after_forward=False)
        runner = PipelineRunner(part, specs, mesh, torch.device("cpu"), n_mb, schedule=name)
        # eval first: the optimizer built after it must still get FSDP's sharded params
        before = runner.forward(odd_images())
        out[name] = _train(runner, part, mesh["pp"].get_group(), dp_rank, 2)
        out[name].update(before=before, after=runner.forward(odd_images()))
    return out


def _worker() -> dict:
    """One spawn of 4 ranks for everything (process start-up dominates the test time): the
    pp=2 runs on the pp group of dp replica 0 (a sub-group: broadcasts use global ranks),
    then dp=2 x pp=2 with FSDP on all four."""
    from vitboost.parallel.dims import ParallelDims
    mesh = ParallelDims(4, pp=2).build_mesh("cpu")
    dp_rank, pp_rank = mesh["dp"].get_local_rank(), mesh["pp"].get_local_rank()
    out = {"dp_rank": dp_rank, "pp_rank": pp_rank}
    if dp_rank == 0:
        out["pp2"] = _pp2(pp_rank, mesh["pp"].get_group())
    out["dp2_pp2"] = _dp2_pp2(mesh, dp_rank, pp_rank)
    return out


# ----------------------------------------------------------------------------- reference

def single_process_reference() -> dict:
    model = tiny_vit()
    before = model(odd_images()).logits.detach()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    rec: dict = {"losses": [], "norms": []}
    for x, y in batches():
        opt.zero_grad()
        loss = F.cross_entropy(model(x).logits, y)
        loss.backward()
        rec["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        rec.setdefault("grads", {k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
        rec["losses"].append(loss.item())
    assert min(rec["norms"]) > MAX_NORM, "clipping must be active for the test to check the pp norm"
    x, y = batches()[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rec["autocast_loss"] = F.cross_entropy(model(x).logits, y).item()
        rec["autocast_logits"] = model(odd_images()).logits.float()
    rec.update(state={k: v.detach().clone() for k, v in model.state_dict().items()},
               before=before, after=model(odd_images()).logits.detach())
    return rec


@pytest.fixture(scope="module")
def reference() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the ranks: same reduction order on any machine
    try:
        return single_process_reference()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_worker, 4)


@pytest.fixture(scope="module")
def pp2(ranks) -> list[dict]:
    return [r["pp2"] for r in sorted(ranks, key=lambda r: r["pp_rank"]) if r["dp_rank"] == 0]


@pytest.fixture(scope="module")
def dp2_pp2(ranks) -> list[dict]:
    return [r["dp2_pp2"] for r in ranks]


def _check_run(runs: list[dict], ref: dict, mean_over_ranks: bool = False) -> None:
    """Losses, clip norms and step-0 grads to 1e-5 relative; final params see note at PARAM_ATOL."""
    if mean_over_ranks:  # each dp rank returns the mean over its half of the batch
        losses = torch.tensor([r["losses"] for r in runs]).mean(0)
    else:
        losses = torch.tensor(runs[0]["losses"])
        for r in runs[1:]:
            assert r["losses"] == runs[0]["losses"], "every pp rank must return the same loss"
    torch.testing.assert_close(losses, torch.tensor(ref["losses"]), rtol=RTOL, atol=0)
    for r in runs:  # the norm is the global one on every rank: the pp all-reduce happened
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(ref["norms"]), rtol=RTOL, atol=0)
    grad_scale = max(g.abs().max() for g in ref["grads"].values())
    seen: set[str] = set()
    diffs = []
    for r in runs:
        for k, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][k], rtol=RTOL, atol=RTOL * grad_scale,
                                       msg=lambda m: f"grad of {k}: {m}")
        for k, v in r["state"].items():
            seen.add(k)
            torch.testing.assert_close(v, ref["state"][k], rtol=RTOL, atol=PARAM_ATOL, msg=lambda m: f"{k}: {m}")
            diffs.append((v - ref["state"][k]).abs().flatten())
    assert seen == set(ref["state"]), "the model parts together must hold every parameter"
    assert torch.cat(diffs).mean() < 1e-7, "parameters drift from the single-process run"


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("schedule", ["1F1B", "GPipe", "Interleaved1F1B"])
def test_pp2_training_matches_single_process(pp2, reference, schedule):
    _check_run([r[schedule] for r in pp2], reference)


@pytest.mark.parametrize("schedule", ["1F1B", "GPipe", "Interleaved1F1B"])
def test_forward_odd_batch_matches_unsplit_model(pp2, reference, schedule):
    for r in pp2:  # logits on every pp rank, 7 rows from 2/4 microbatches
        assert r[schedule]["before"].shape == (7, 3)
        torch.testing.assert_close(r[schedule]["before"], reference["before"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r[schedule]["after"], reference["after"], rtol=RTOL, atol=1e-5)


def test_autocast_and_soft_targets(pp2, reference):
    for r in pp2:
        assert abs(r["autocast_loss"] - reference["autocast_loss"]) < 2e-2
        torch.testing.assert_close(r["autocast_logits"], reference["autocast_logits"], rtol=0, atol=5e-2)
        loss, ref_loss, grad_err = r["soft"]
        assert abs(loss - ref_loss) < 1e-5 and grad_err < 1e-6


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_dp2_pp2_fsdp_matches_single_process(dp2_pp2, reference, schedule):
    _check_run([r[schedule] for r in dp2_pp2], reference, mean_over_ranks=True)
    for r in dp2_pp2:  # eval through FSDP-wrapped stages, odd batch
        torch.testing.assert_close(r[schedule]["before"], reference["before"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r[schedule]["after"], reference["after"], rtol=RTOL, atol=1e-5)


def test_state_dict_keys_partition_full_model():
    full_keys = set(tiny_vit().state_dict())
    parts = [set(split_model(tiny_vit(), r, 2)[0].state_dict()) for r in range(2)]
    assert parts[0] | parts[1] == full_keys and not parts[0] & parts[1]
    assert any("embeddings" in k for k in parts[0]) and not any("embeddings" in k for k in parts[1])
    assert any(k.startswith("classifier") for k in parts[1]) and not any(k.startswith("classifier") for k in parts[0])
    _, specs = split_model(tiny_vit(8), 1, 2, stages_per_rank=2)  # loop layout: rank 1 has stages 1, 3
    assert [(s.index, s.block_keys) for s in specs] == [(1, ("2", "3")), (3, ("6", "7"))]
    _, specs = split_model(tiny_vit(6), 0, 4)  # 6 blocks / 4 stages: first and last take one fewer
    assert specs[0].block_keys == ("0",)


def test_too_few_layers_raises():
    with pytest.raises(ValueError, match="cannot split 4 ViT blocks into 8 pipeline stages"):
        split_model(tiny_vit(), 0, 4, stages_per_rank=2)
