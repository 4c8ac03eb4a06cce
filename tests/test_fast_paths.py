"""Speed features change speed, never the result."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from vitboost.model import PatchLinear, build_model, linear_patch_embedding


def _model(**kw):
    model, _ = build_model("vit-micro", ["a", "b", "c"], pretrained="none", log=lambda *a: None, **kw)
    return model


def test_patch_linear_equals_the_convolution_it_replaces() -> None:
    torch.manual_seed(0)
    lin_model = _model(image_size=48, patch_size=8)  # build_model applies it to every model
    proj = lin_model.vit.embeddings.patch_embeddings.projection
    assert type(proj) is PatchLinear
    conv_model = copy.deepcopy(lin_model)
    conv_model.vit.embeddings.patch_embeddings.projection.__class__ = torch.nn.Conv2d  # the HF original
    assert list(lin_model.state_dict()) == list(conv_model.state_dict())  # same keys: checkpoints unchanged
    x = torch.randn(4, 3, 48, 48, requires_grad=True)
    a, b = conv_model(pixel_values=x).logits, lin_model(pixel_values=x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    b.sum().backward()
    a.sum().backward()
    wa = conv_model.vit.embeddings.patch_embeddings.projection.weight.grad
    wb = lin_model.vit.embeddings.patch_embeddings.projection.weight.grad
    torch.testing.assert_close(wb, wa, rtol=1e-4, atol=1e-6)


def test_patch_linear_drops_partial_patches_like_a_strided_convolution() -> None:
    conv = torch.nn.Conv2d(3, 16, 8, stride=8)
    lin = copy.deepcopy(conv)
    lin.__class__ = PatchLinear
    x = torch.randn(2, 3, 37, 45)  # 4 x 5 whole patches, the rest is dropped
    torch.testing.assert_close(lin(x), conv(x), rtol=1e-5, atol=1e-6)


def test_patch_linear_leaves_other_convolutions_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 4, stride=4))
    assert linear_patch_embedding(net) == 1
    assert type(net[0]) is torch.nn.Conv2d and type(net[1]) is PatchLinear


def test_the_cli_loads_transformers_without_the_extras_a_vit_never_uses(tmp_path) -> None:
    """transformers imports scipy for detection losses as soon as its modeling code loads, if scipy is
    installed. A stand-in scipy (a package and its metadata) records whether it was imported."""
    import os
    import subprocess
    import sys
    from tests.conftest import REPO
    (tmp_path / "scipy").mkdir()
    (tmp_path / "scipy" / "__init__.py").write_text("import os\nopen(os.environ['MARK'], 'a').write('imported')\n")
    (tmp_path / "scipy" / "optimize.py").write_text("def linear_sum_assignment(*a): pass\n")
    (tmp_path / "scipy-1.14.0.dist-info").mkdir()
    (tmp_path / "scipy-1.14.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: scipy\nVersion: 1.14.0\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    # scikit-learn, where installed, would import the real scipy's submodules: hidden (find_spec sees None)
    check = ("import sys; sys.modules['sklearn'] = None\n"
             "import transformers.utils as tu, transformers.utils.import_utils as iu\n"
             "assert tu.is_scipy_available() and iu.is_scipy_available()  # later imports: the real answer\n"
             "from transformers import ViTForImageClassification\n")
    for lean, imported in ((False, True), (True, False)):
        mark = tmp_path / f"mark_{lean}"
        code = ("from vitboost.model import import_transformers_lean; import_transformers_lean()\n" if lean else "") + check
        subprocess.run([sys.executable, "-c", code], env={**env, "MARK": str(mark)}, check=True, timeout=300)
        assert mark.exists() == imported


@contextlib.contextmanager
def _block_input_dtypes(model):
    """Records the dtype of the hidden states each transformer block receives, while inside."""
    from vitboost.parallel.tensor import find_blocks
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)) for _, b in find_blocks(model)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _block_inputs(model, x):
    """The dtypes each block receives in one forward, and the logits."""
    with _block_input_dtypes(model) as seen:
        out = model(pixel_values=x).logits
    return seen, out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_low_precision_autocast_the_residual_stream_between_blocks_is_in_that_dtype(dtype) -> None:
    from vitboost.model import low_precision_residual_stream
    torch.manual_seed(0)
    plain = _model(image_size=32, patch_size=8)
    hooked = copy.deepcopy(plain)
    assert low_precision_residual_stream(hooked)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=dtype):
        assert set(_block_inputs(plain, x)[0]) == {torch.float32}  # what autocast alone gives
        seen, out = _block_inputs(hooked, x)
        assert set(seen) == {dtype}
        torch.testing.assert_close(out.float(), plain(pixel_values=x).logits.float(), rtol=0.05, atol=0.05)
    seen, out = _block_inputs(hooked, x)  # no autocast: fp32, the same numbers
    assert set(seen) == {torch.float32}
    assert torch.equal(out, plain(pixel_values=x).logits)
    assert list(hooked.state_dict()) == list(plain.state_dict())


def test_the_low_precision_residual_stream_can_be_switched_off_and_a_later_pipeline_stage_has_none(monkeypatch) -> None:
    from vitboost.model import low_precision_residual_stream
    from vitboost.parallel.tensor import find_blocks
    assert not low_precision_residual_stream(find_blocks(_model())[0][1])  # a stage without the embeddings
    monkeypatch.setenv("VITBOOST_RESIDUAL_FP32", "1")
    assert not low_precision_residual_stream(_model())


@pytest.mark.parametrize("precision, stream", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                               ("fp32", torch.float32)])
def test_the_engine_trains_and_evaluates_with_the_stream_in_the_compute_dtype(precision, stream) -> None:
    """parallelize() applies it, so torch_ddp's unwrapped module runs the numerics FSDP's param_dtype gives.
    fp16 is built as the fp32 plan with its precision replaced: the CLI refuses fp16 on the CPU."""
    import dataclasses
    from vitboost.augment import soft_cross_entropy
    from vitboost.config import make_config
    from vitboost.engine import Engine
    from vitboost.parallel.dims import ParallelDims, init_distributed
    from vitboost.parallel.plan import make_plan
    init_distributed("cpu")
    cfg = make_config({"model": "vit-micro", "pretrained": "none", "batch_size": 2, "mixed_precision": precision,
                       "device": "cpu"})
    dims = ParallelDims(1)
    dims.build_mesh("cpu")
    model = _model()
    plan = make_plan(cfg, "cpu", 1) if precision != "fp16" else dataclasses.replace(
        make_plan(dataclasses.replace(cfg, mixed_precision="fp32"), "cpu", 1), precision="fp16")
    engine = Engine(model, cfg, dims, plan, torch.device("cpu"), soft_cross_entropy)
    x, y = torch.randn(2, 3, 32, 32), torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    with _block_input_dtypes(engine.model) as seen:
        engine.train_step([(x, y)])
        engine.logits(x)
    assert seen and set(seen) == {stream}


def test_speed_levers_bounds_free_exactly_each_blocks_gelu_and_layernorms() -> None:
    """benchmarks/speed_levers.py's `nogelu` / `nonorm` bounds (BENCHMARKS.md section 34) measure a step
    without those kernels: every block loses them, nothing else changes, and the model still runs."""
    import importlib.util
    from pathlib import Path
    from vitboost.parallel.tensor import find_blocks
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_levers.py"
    spec = importlib.util.spec_from_file_location("speed_levers", path)
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    model = _model()
    blocks = len(find_blocks(model))
    params = sum(p.numel() for p in model.parameters())
    assert levers.free_kernels(model, ["nogelu"]) == blocks
    assert levers.free_kernels(model, ["nonorm"]) == 2 * blocks
    kinds = {type(m).__name__ for _, b in find_blocks(model) for m in b.modules()}
    assert "LayerNorm" not in kinds and not any("gelu" in k.lower() for k in kinds)
    assert isinstance(model.vit.layernorm, torch.nn.LayerNorm)  # the final norm is outside the blocks
    norms = 2 * blocks * 2 * model.config.hidden_size  # each norm's weight and bias
    assert sum(p.numel() for p in model.parameters()) == params - norms
    assert model(pixel_values=torch.randn(1, 3, 32, 32)).logits.isfinite().all()


def _cls_only(model):
    from vitboost.model import class_token_last_block
    from vitboost.parallel.tensor import find_blocks
    if not hasattr(find_blocks(model)[0][1].attention, "q_proj"):
        pytest.skip("transformers 4.x block layout: left as it is")
    return class_token_last_block(model)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("qkv", ["one_gemm", "lora", "hf_eager_attention"])
def test_the_last_block_computed_for_the_cls_token_gives_the_full_blocks_logits_and_gradients(qkv) -> None:
    """The classifier reads token 0 only, so the last block's other rows never reach the loss: skipping them
    must leave the logits and every parameter's gradient as the stock block gives them."""
    from vitboost.config import TrainConfig
    from vitboost.lora import apply_lora
    from vitboost.model import ClassTokenBlock, fuse_qkv
    from vitboost.parallel.tensor import find_blocks
    torch.manual_seed(0)
    stock = _model().train()
    if qkv == "lora":  # peft's layers hold q, k and v: the block calls them as they are
        stock = apply_lora(stock, TrainConfig(model="vit-micro", lora_rank=4), log=lambda *_: None)
        for n, p in stock.named_parameters():  # LoRA's B starts at zero: give the adapters a gradient path
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    if qkv == "hf_eager_attention":
        stock.config._attn_implementation = "eager"
    ours = copy.deepcopy(stock)
    fuse_qkv(ours)
    assert _cls_only(ours)
    blocks = find_blocks(ours)
    assert [isinstance(b, ClassTokenBlock) for _, b in blocks] == [False] * (len(blocks) - 1) + [True]
    x = torch.randn(3, 3, 32, 32)
    ref, out = stock(pixel_values=x), ours(pixel_values=x)
    assert out.logits.shape == ref.logits.shape
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    ref.logits.square().sum().backward()
    out.logits.square().sum().backward()
    g_ref, g_out = _grads(stock), _grads(ours)
    assert g_ref.keys() == g_out.keys() and all(g is not None for g in g_out.values())
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert list(ours.state_dict()) == list(stock.state_dict())  # checkpoints and export unchanged


def test_only_the_stage_holding_the_classifier_computes_its_last_block_for_the_cls_token(monkeypatch) -> None:
    """A pipeline stage without the classifier passes every token on to the next stage; a model whose
    head reads every token (here: the bare ViTModel) is left as it is; VITBOOST_CLS_ONLY=0 keeps HF's block."""
    from vitboost.model import ClassTokenBlock
    from vitboost.parallel.pipeline import split_model
    from vitboost.parallel.tensor import find_blocks
    first, _ = split_model(_model(), pp_rank=0, pp_size=2)
    assert not _cls_only(first)
    last, _ = split_model(_model(), pp_rank=1, pp_size=2)
    assert _cls_only(last) and isinstance(find_blocks(last)[-1][1], ClassTokenBlock)
    assert not _cls_only(_model().vit)
    monkeypatch.setenv("VITBOOST_CLS_ONLY", "0")
    assert not _cls_only(_model())


def test_the_engine_trains_the_cls_only_block_as_the_stock_one() -> None:
    """parallelize() applies it to torch_ddp's model: three steps match the stock block's losses and weights."""
    from vitboost.augment import soft_cross_entropy
    from vitboost.config import make_config
    from vitboost.engine import Engine
    from vitboost.model import ClassTokenBlock
    from vitboost.parallel.dims import ParallelDims, init_distributed
    from vitboost.parallel.plan import make_plan
    from vitboost.parallel.tensor import find_blocks
    init_distributed("cpu")
    cfg = make_config({"model": "vit-micro", "pretrained": "none", "batch_size": 4, "mixed_precision": "fp32",
                       "device": "cpu"})
    dims = ParallelDims(1)
    dims.build_mesh("cpu")
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 0]), 3).float()
    runs = []
    for cls_only in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VITBOOST_CLS_ONLY", cls_only)
            torch.manual_seed(1)
            engine = Engine(_model(), cfg, dims, make_plan(cfg, "cpu", 1), torch.device("cpu"), soft_cross_entropy)
        assert isinstance(find_blocks(engine.model)[-1][1], ClassTokenBlock) == (cls_only == "1")
        losses = [float(engine.train_step([(x, y)])[0]) for _ in range(3)]
        runs.append((losses, {k: v.detach().clone() for k, v in engine.model.state_dict().items()}))
    (l1, w1), (l0, w0) = runs
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=0)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-4, atol=1e-5, msg=k)


def test_vitboost_eval_and_predict_run_an_exported_model_as_the_trainer_evaluated_it(tmp_path) -> None:
    """A trained folder is HF's own classes; loaded for `vitboost eval` / `predict` it gets the trainer's
    forward again (one GEMM for q, k, v; the CLS-only last block) and the same logits as HF's."""
    from transformers import ViTForImageClassification
    from vitboost.model import ClassTokenBlock, FusedQKVAttention
    from vitboost.parallel.tensor import find_blocks
    from vitboost.predict import LocalModel
    torch.manual_seed(0)
    _model().save_pretrained(tmp_path / "model")
    if not hasattr(find_blocks(_model())[0][1].attention, "q_proj"):
        pytest.skip("transformers 4.x block layout: left as it is")
    ours = LocalModel(str(tmp_path / "model"), device="cpu")
    blocks = [b for _, b in find_blocks(ours.model)]
    assert isinstance(blocks[-1], ClassTokenBlock) and all(isinstance(b.attention, FusedQKVAttention) for b in blocks)
    hf = ViTForImageClassification.from_pretrained(tmp_path / "model").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(x), hf(pixel_values=x).logits, rtol=1e-5, atol=1e-6)
