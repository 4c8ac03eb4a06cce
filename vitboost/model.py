"""Build the ViT: from the hub, from a local HF folder, or from a named config.

Whatever the source, the classifier head is fitted to the dataset's labels and the
preprocessing (input size, mean, std) comes from the model's own image-processor
config, so fine-tuning sees exactly what the pretrained weights were trained on.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# name: (hidden, layers, heads, mlp, patch, image)
NAMED_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "vit-micro": (64, 2, 4, 128, 8, 32),  # for tests: seconds on a CPU
    "vit-tiny": (192, 12, 3, 768, 16, 224),
    "vit-small": (384, 12, 6, 1536, 16, 224),
    "vit-base": (768, 12, 12, 3072, 16, 224),
    "vit-large": (1024, 24, 16, 4096, 16, 224),
    "vit-huge": (1280, 32, 16, 5120, 14, 224),
    "vit-giant": (1408, 40, 16, 6144, 14, 224),  # ViT-g/14, ~1.0B params
}


ATTENTION = "vitboost_sdpa"  # torch's fused attention, called with no mask (see vit_sdpa_attention)


def vit_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA for ViT, which attends to every token: never a mask, never causal.

    transformers' stock ``sdpa`` function materializes a mask whenever it cannot inspect values
    (CUDA-graph capture, torch.compile tracing), which rules out FlashAttention: capture fails
    and whole-model compile decomposes attention into matmuls and a softmax (BENCHMARKS.md).
    Registered through ``AttentionInterface``, so parameter names, checkpoints and export are
    untouched; an exported config names plain ``sdpa``.
    """
    out = nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


class FusedQKVAttention:
    """ViT attention whose q, k and v come from one GEMM (timm's layout) instead of three.

    The three projections keep their own parameters (``q_proj.weight``...), so checkpoints,
    export, EMA and optimizer state are unchanged; the forward concatenates the weights (a
    copy of 3 x D x D, small beside the activations) and splits the product as views. At the
    batch sizes users train the step is many small kernels: one GEMM in place of three, forward
    and backward (BENCHMARKS.md section 24). Mixed into transformers 5.x's ``ViTAttention``
    by ``fuse_qkv``; its forward mirrors that class's, a test checks it against it.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = _heads_in_one_gemm(hidden_states, (self.q_proj, self.k_proj, self.v_proj), self.head_dim)
        out, weights = _attend(self, query, key, value, attention_mask, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _heads_in_one_gemm(x: torch.Tensor, linears: tuple[nn.Linear, ...], head_dim: int) -> tuple[torch.Tensor, ...]:
    """``x`` through several ``nn.Linear`` as one GEMM (their weights concatenated), each output split into
    heads as a view: ``[batch, heads, tokens, head_dim]`` per linear."""
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    y = nn.functional.linear(x, torch.cat([m.weight for m in linears]), bias)  # [batch, tokens, n * heads * d]
    return y.unflatten(-1, (len(linears), -1, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)


def _attend(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function ``attn``'s config names (ours, HF's sdpa or eager), called as ViTAttention calls it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, _eager_attention)
    return attention(attn, query, key, value, attention_mask,
                     dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling, **kwargs)


def _eager_attention(*args, **kwargs):
    from transformers.models.vit.modeling_vit import eager_attention_forward
    return eager_attention_forward(*args, **kwargs)


_FUSED: dict[type, type] = {}


def fuse_qkv(model: nn.Module) -> int:
    """Switch every ViT attention whose q, k and v are plain ``nn.Linear`` (not LoRA-wrapped, not
    tensor-parallel) to one GEMM for the three; returns how many. transformers 4.x's attention
    (``attention.attention.query``) is left as it is. ``VITBOOST_FUSED_QKV=0`` keeps HF's three
    projections (as timm's ``TIMM_FUSED_ATTN``): for A/B measurements and numerics bisection."""
    if os.environ.get("VITBOOST_FUSED_QKV", "1") == "0":
        return 0
    n = 0
    for m in model.modules():
        cls = type(m)
        if (cls.__name__ == "ViTAttention" and hasattr(m, "head_dim") and hasattr(m, "scaling")
                and all(type(getattr(m, p, None)) is nn.Linear for p in ("q_proj", "k_proj", "v_proj", "o_proj"))):
            if cls not in _FUSED:
                _FUSED[cls] = type(f"Fused{cls.__name__}", (FusedQKVAttention, cls), {})
            m.__class__ = _FUSED[cls]
            n += 1
    return n


class ClassTokenBlock:
    """ViT's last block, computed for the CLS token only: its output is all the classifier reads.

    ``ViTForImageClassification`` takes ``last_hidden_state[:, 0]``, so of the last block only the
    CLS token's row reaches the loss: its query, attention output, MLP and residual adds are
    needed for one token, while keys and values are still needed for every token. Computing just
    that row gives the same logits and the same gradients (no input to them is dropped), and
    skips ~10/12 of one block's GEMM work and most of its attention: about 1/15 of ViT-B's step
    (BENCHMARKS.md section 37). Parameters are untouched (checkpoints, export and optimizer state
    are the same); the block returns ``[batch, 1, hidden]``, so ``last_hidden_state`` has one token.
    Mixed into transformers 5.x's ``ViTLayer`` by ``class_token_last_block``; a test checks its
    output and gradients against the stock block's.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        attn, batch = self.attention, hidden_states.shape[0]
        x = self.layernorm_before(hidden_states)
        query = attn.q_proj(x[:, :1]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)  # [batch, heads, 1, d]
        if isinstance(attn, FusedQKVAttention):  # k and v from one GEMM, as the other blocks
            key, value = _heads_in_one_gemm(x, (attn.k_proj, attn.v_proj), attn.head_dim)
        else:  # e.g. LoRA-wrapped projections: call them as they are
            key, value = (m(x).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2) for m in (attn.k_proj, attn.v_proj))
        if attention_mask is not None:  # [batch, heads, queries, keys]: the CLS query's row
            attention_mask = attention_mask[..., :1, :]
        out, _ = _attend(attn, query, key, value, attention_mask, **kwargs)
        hidden = self.dropout(attn.o_proj(out.reshape(batch, 1, -1))) + hidden_states[:, :1]
        return self.dropout(self.mlp(self.layernorm_after(hidden))) + hidden


_CLASS_TOKEN: dict[type, type] = {}


def class_token_last_block(model: nn.Module) -> bool:
    """Compute the model's last block for the CLS token only (``ClassTokenBlock``); returns whether it did.

    Only for a classifier that reads token 0 (``ViTForImageClassification``, or the last pipeline
    stage, which holds it) with transformers 5.x's blocks; not under tensor parallel (its hooks wrap
    the attention module, which this block reaches past). ``VITBOOST_CLS_ONLY=0`` keeps the stock
    block, for A/B runs.
    """
    from .parallel.tensor import find_blocks
    if os.environ.get("VITBOOST_CLS_ONLY", "1") == "0":
        return False
    if getattr(model, "classifier", None) is None or type(model).__name__ != "ViTForImageClassification":
        return False
    blocks = find_blocks(model)
    if not blocks:
        return False
    block = blocks[-1][1]
    cls = type(block)
    if cls.__name__ != "ViTLayer" or not all(hasattr(block, a) for a in (
            "layernorm_before", "layernorm_after", "mlp", "dropout")) or not hasattr(block.attention, "q_proj"):
        return False  # transformers 4.x's layout (attention.attention.query): left as it is
    if cls not in _CLASS_TOKEN:
        _CLASS_TOKEN[cls] = type(f"ClassToken{cls.__name__}", (ClassTokenBlock, cls), {})
    block.__class__ = _CLASS_TOKEN[cls]
    return True


def low_precision_residual_stream(model: nn.Module) -> bool:
    """Under bf16 or fp16 autocast, keep ViT's residual stream in that dtype: the embeddings' output is cast once.

    Autocast leaves the stream in fp32 (the position-embedding add promotes it, and each block's
    ``x + f(x)`` adds a low-precision branch to an fp32 ``x``), so every LayerNorm and residual add
    moves twice the bytes it needs. FSDP's ``param_dtype`` (our fsdp and gemini plans, torchtitan)
    already runs the stream in the compute dtype, and ColossalAI's fp16 ZeRO and gemini run the whole
    model in fp16; this gives the unwrapped, DDP, TP and pipelined model the same numerics. ViT-B on an
    H200: bf16 batch 256 +3.3% (BENCHMARKS.md section 33), fp16 batch 128 in section 36. fp16's range:
    each branch added to the stream is an fp16 GEMM's output already, and the LayerNorms still compute
    in fp32; what is new is their sum stored in fp16, which overflows past 65,504 (the loss scale then
    skips the step, as for any fp16 overflow). fp32 runs are untouched.
    Returns whether the model has embeddings to hook (a later pipeline stage has none: it receives the
    stream as stage 0 sends it). ``VITBOOST_RESIDUAL_FP32=1`` keeps autocast's fp32 stream, for A/B runs.
    """
    if os.environ.get("VITBOOST_RESIDUAL_FP32", "0") == "1":
        return False
    embeddings = next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "embeddings"), None)
    if embeddings is None:
        return False
    embeddings.register_forward_hook(_stream_in_autocast_dtype)
    return True


def _stream_in_autocast_dtype(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    kind = out.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        if dtype in (torch.bfloat16, torch.float16):
            return out.to(dtype)
    return out


# transformers imports scikit-learn (assisted generation, 5.17), scipy (detection losses) and
# torchvision (fast image processors) as soon as ViT's modeling code loads, if they are installed:
# 1.9 s of a 3-epoch ViT-B run's ~11 s on an H200 (python -X importtime, BENCHMARKS.md), none of
# it used by a ViT classifier. The CLI, where no user code shares the process, loads transformers
# with those packages reported absent; later imports see the real answers again.
UNUSED_EXTRAS = ("is_sklearn_available", "is_scipy_available", "is_torchvision_available")


def import_transformers_lean() -> None:
    """Import transformers' ViT modeling code without the extras above (call before any other
    transformers import; a no-op once transformers' modeling code is loaded)."""
    import sys
    if "transformers.modeling_utils" in sys.modules:
        return
    import transformers.utils as tu
    import transformers.utils.import_utils as iu
    saved = [(m, n, getattr(m, n)) for n in UNUSED_EXTRAS for m in (iu, tu) if hasattr(m, n)]
    for m, n, _ in saved:
        setattr(m, n, _absent)
    try:
        from transformers import ViTForImageClassification  # noqa: F401  (loads modeling_utils and ViT)
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)


def _absent(*args, **kwargs) -> bool:
    return False


def _register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION, vit_sdpa_attention)


class ModelError(ValueError):
    """A model that cannot be built; the message names the fix."""


@dataclass
class Preprocess:
    """What the image processor does, in numbers (applied on the device)."""
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bilinear"

    def to_hf(self) -> dict:
        """A ViTImageProcessor config, so exported folders work in transformers.pipeline."""
        return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                "size": {"height": self.image_size, "width": self.image_size},
                "resample": 3 if self.resample == "bicubic" else 2,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": list(self.mean), "image_std": list(self.std)}


def read_preprocess(folder: Path, image_size: int) -> Preprocess:
    p = folder / "preprocessor_config.json"
    if not p.is_file():
        return Preprocess(image_size)
    cfg = json.loads(p.read_text())
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", image_size))
    resample = "bicubic" if cfg.get("resample") == 3 else "bilinear"
    return Preprocess(int(size), tuple(cfg.get("image_mean", (0.5,) * 3)), tuple(cfg.get("image_std", (0.5,) * 3)), resample)


def named_config(name: str, num_labels: int, image_size: int | None = None, patch_size: int | None = None,
                 dropout: float = 0.0):
    from transformers import ViTConfig
    hidden, layers, heads, mlp, patch, image = NAMED_CONFIGS[name]
    return ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=mlp, patch_size=patch_size or patch, image_size=image_size or image,
                     num_labels=num_labels, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def _hub_error(name: str, err: Exception) -> ModelError:
    base = name.rsplit("/", 1)[-1]
    guess = "vit-base" if "base" in base else "vit-large" if "large" in base else "vit-huge" if "huge" in base else "vit-small"
    return ModelError(f"cannot load model {name!r} from the Hugging Face hub (offline or unreachable: "
                      f"{type(err).__name__}); pass a local HF folder with --model PATH, or train from random "
                      f"init with --model {guess} --pretrained none")


def refuse_custom_code(folder: Path) -> None:
    """vitboost never runs code that ships with a model: a folder whose config maps to its own Python
    classes (auto_map) is refused in one line, before transformers could prompt for trust_remote_code."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {folder / 'config.json'} ({type(e).__name__}); pass an HF save_pretrained "
                         f"folder") from None
    if not isinstance(config, dict):
        raise ModelError(f"{folder / 'config.json'} is not an HF model config; pass an HF save_pretrained folder")
    if "auto_map" in config:
        raise ModelError(f"model folder {folder} ships custom code (auto_map in config.json), which vitboost never "
                         f"runs; pass a plain ViT folder (model_type 'vit') or a named config")


def build_model(name: str, label_names: list[str], *, pretrained: str = "auto", image_size: int | None = None,
                patch_size: int | None = None, dropout: float = 0.0, device: torch.device | str | None = None,
                log=print) -> tuple[nn.Module, Preprocess]:
    """Return (ViTForImageClassification with a head for ``label_names``, its preprocessing).

    A random init runs on ``device`` (default: the CPU): on a GPU, ViT-B's init takes
    milliseconds instead of ~5 s of CPU work, and no copy follows. Every rank seeds alike,
    so every rank draws the same weights (FSDP and TP do not broadcast them).
    """
    import contextlib
    on_device = torch.device(device) if device is not None else contextlib.nullcontext()
    from transformers import AutoConfig, ViTForImageClassification

    _register_attention()
    n = len(label_names)
    id2label = {i: l for i, l in enumerate(label_names)}
    label2id = {l: i for i, l in id2label.items()}
    if pretrained not in ("auto", "none", "true"):
        raise ModelError(f"--pretrained must be auto, true or none, got {pretrained!r}")

    if name in NAMED_CONFIGS:
        if pretrained == "true":
            raise ModelError(f"{name!r} is a named config without weights; use --pretrained none or a hub id / folder")
        config = named_config(name, n, image_size, patch_size, dropout)
        config.id2label, config.label2id = id2label, label2id
        with on_device:
            model = ViTForImageClassification._from_config(config, attn_implementation=ATTENTION)
        linear_patch_embedding(model)
        log(f"model: {name} (random init, {_count(model) / 1e6:.1f}M params, {config.image_size}px, patch {config.patch_size})")
        return model, Preprocess(config.image_size)

    folder = Path(name).expanduser()
    is_local = folder.exists()
    if is_local and not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json; pass an HF save_pretrained folder or a "
                         f"named config ({', '.join(NAMED_CONFIGS)})")
    if is_local:
        refuse_custom_code(folder)
    if not is_local and ("/" not in name or name.startswith((".", "/", "~"))):
        raise ModelError(f"unknown --model {name!r}: not a folder, not a hub id (org/name), not a named config "
                         f"({', '.join(NAMED_CONFIGS)})")
    if image_size or patch_size:
        raise ModelError("--image_size/--patch_size only apply to named configs; pretrained models keep their own")
    kw = dict(num_labels=n, id2label=id2label, label2id=label2id, hidden_dropout_prob=dropout,
              attention_probs_dropout_prob=dropout)
    try:
        if pretrained == "none":
            config = AutoConfig.from_pretrained(name, trust_remote_code=False, **kw)
            with on_device:
                model = ViTForImageClassification._from_config(config, attn_implementation=ATTENTION)
            log(f"model: {name} config, random init ({_count(model) / 1e6:.1f}M params)")
        else:
            hf_log = logging.getLogger("transformers.modeling_utils")
            level = hf_log.level
            hf_log.setLevel(logging.ERROR)  # we print our own one-line note about the new head
            try:
                model, info = ViTForImageClassification.from_pretrained(
                    name, ignore_mismatched_sizes=True, output_loading_info=True, attn_implementation=ATTENTION, **kw)
            finally:
                hf_log.setLevel(level)
            fresh = sorted(set(info.get("missing_keys", [])) | {k[0] if isinstance(k, tuple) else k
                                                                for k in info.get("mismatched_keys", [])})
            log(f"model: {name} (pretrained, {_count(model) / 1e6:.1f}M params)")
            if fresh:
                log(f"re-initialized for {n} labels: {', '.join(fresh)}")
    except (OSError, ConnectionError, TimeoutError) as e:
        if is_local:
            raise ModelError(f"cannot read model folder {folder}: {e}".splitlines()[0]) from None
        raise _hub_error(name, e) from None
    except ValueError as e:
        raise ModelError(f"cannot build model {name!r}: {str(e).splitlines()[0]}") from None
    if model.config.model_type != "vit":
        raise ModelError(f"{name!r} is a {model.config.model_type!r} model; vitboost trains ViT (model_type 'vit')")
    linear_patch_embedding(model)  # same weights and outputs, ~5% faster training on ViT-B (BENCHMARKS.md)
    pre = read_preprocess(folder, model.config.image_size) if is_local else _hub_preprocess(name, model.config.image_size)
    return model, pre


def _hub_preprocess(name: str, image_size: int) -> Preprocess:
    try:
        from huggingface_hub import hf_hub_download
        return read_preprocess(Path(hf_hub_download(name, "preprocessor_config.json")).parent, image_size)
    except Exception:  # weights loaded but no processor config: ViT defaults
        return Preprocess(image_size)


class PatchLinear(nn.Conv2d):
    """A patchify convolution (kernel == stride, no padding) computed as one matmul.

    Same parameters, same state-dict keys, same output layout as the ``nn.Conv2d`` it replaces,
    but the cuDNN path it avoids pays for NCHW->NHWC conversions in forward and backward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.kernel_size[0]
        gh, gw = h // p, w // p
        if h != gh * p or w != gw * p:  # a strided conv drops the pixels that do not fill a patch
            x = x[:, :, :gh * p, :gw * p]
        patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        y = nn.functional.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # [b, n, d]
        return y.transpose(1, 2).unflatten(2, (gh, gw))  # [b, d, gh, gw] as a view: no copy


def linear_patch_embedding(model: nn.Module) -> int:
    """Swap every patchify Conv2d of the model for PatchLinear (in place); returns how many."""
    n = 0
    for mod in model.modules():
        if (type(mod) is nn.Conv2d and mod.kernel_size == mod.stride and mod.kernel_size[0] == mod.kernel_size[1]
                and mod.padding == (0, 0) and mod.dilation == (1, 1) and mod.groups == 1):
            mod.__class__ = PatchLinear
            n += 1
    return n


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_pretrained(model: nn.Module, pre: Preprocess, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write an HF folder (config + safetensors + preprocessor config) atomically: tmp name, then rename."""
    import shutil
    out = Path(out)
    from transformers.utils import logging as hf_logging
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp, state_dict=state_dict)
    (tmp / "preprocessor_config.json").write_text(json.dumps(pre.to_hf(), indent=2))
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
