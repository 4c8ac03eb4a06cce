"""LoRA fine-tuning through peft: low-rank adapters on the block linears, the new head fully trained.

Why peft: it is what HF users already run (the PEFT image-classification guide), its adapters
load with ``PeftModel.from_pretrained``, and ``merge_and_unload`` gives back a plain model.

How it fits the rest of vitboost:

- :func:`apply_lora` injects peft's LoRA layers into the HF model *in place* (``get_peft_model``,
  then its base model: the same ``ViTForImageClassification`` object), so every strategy, the
  FSDP units (``find_blocks``) and the pipeline splitter see the usual module tree. Only the
  adapters and the head (peft ``modules_to_save``) require grad, and the Engine's optimizer takes
  only parameters that require grad.
- Checkpoints stay DCP keyed by the model's own names, as peft leaves them: a targeted linear
  becomes ``<name>.base_layer.weight`` plus ``<name>.lora_A.default.weight`` / ``lora_B``, the
  head ``classifier.modules_to_save.default.*`` (peft also keeps the frozen original head). The
  frozen base is saved with the adapters, so resume and export need nothing but the run folder.
- The run's ``LoraConfig`` is saved as ``hf_config/adapter_config.json``. Export rebuilds the
  same model, loads the checkpoint and merges (:func:`export_lora`): a plain HF folder that
  ``transformers.pipeline`` loads, and the adapter alone (peft's format) beside it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

from torch import nn

from .config import ConfigError, TrainConfig

ADAPTER_CONFIG = "adapter_config.json"
HEAD = "classifier"


def block_linears(model: nn.Module) -> list[str]:
    """The attention and MLP linears of a ViT block (names relative to the block), from the same
    table tensor parallel uses: q/k/v/o and fc1/fc2 in transformers 5.x, query/key/... in 4.x."""
    from .parallel.tensor import _layout, find_blocks
    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(f"no ViT blocks found in {type(model).__name__}; LoRA needs an HF ViT classifier")
    layout = _layout(blocks[0][1])
    return list(layout["colwise"] + layout["rowwise"])


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target must name a linear (peft matches a suffix of the module name)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(HEAD)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linears):
            known = ", ".join(block_linears(model))
            raise ConfigError(f"--lora_targets {t!r} matches no linear layer of the model; use names such as "
                              f"{known} (or their last part, e.g. {known.split(', ')[0].rsplit('.', 1)[-1]})")


def apply_lora(model: nn.Module, cfg: TrainConfig, log: Callable = print) -> nn.Module:
    """With ``--lora_rank R``: inject LoRA in place and freeze everything else but the head.
    Returns the model (the same object); without LoRA, returns it untouched."""
    if not cfg.lora_rank:
        return model
    from peft import LoraConfig, get_peft_model
    targets = cfg.lora_targets or block_linears(model)
    _check_targets(model, targets)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout or 0.0,
                        target_modules=targets, modules_to_save=[HEAD])
    base = None if cfg.pretrained == "none" or _is_named(cfg.model) else cfg.model
    if base is not None and Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    with warnings.catch_warnings():  # peft asks transformers a deprecated gradient-checkpointing question
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base
    model = peft_model.get_base_model()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if not _is_original_head(p, model))
    log(f"lora: rank {cfg.lora_rank}, alpha {alpha:g} on {', '.join(targets)} + the {HEAD} (fully trained): "
        f"{trainable / 1e6:.3g}M of {total / 1e6:.4g}M parameters train ({100 * trainable / total:.2f}%)")
    return model


def _is_named(name: str) -> bool:
    from .model import NAMED_CONFIGS
    return name in NAMED_CONFIGS


def _is_original_head(p, model: nn.Module) -> bool:
    """peft's frozen copy of the head: not part of the model that runs or gets exported."""
    original = getattr(getattr(model, HEAD, None), "original_module", None)
    return original is not None and any(p is q for q in original.parameters())


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_config(model: nn.Module, folder: Path) -> None:
    """hf_config/adapter_config.json: what export needs to rebuild the same adapters."""
    if is_lora(model):
        model.peft_config["default"].save_pretrained(str(folder))


def check_resume(cfg: TrainConfig, output: Path, model: nn.Module) -> None:
    """Refuse in one line, before the run folder is touched, to resume a LoRA checkpoint without the
    same LoRA (or a full fine-tuning one with it): DCP would stop on a missing key with a long traceback."""
    from .checkpoint import DamagedCheckpoint, candidates, read_metadata
    if not cfg.resume:
        return
    meta = checkpoint = None
    for checkpoint in candidates(output / "checkpoints") if cfg.resume == "auto" else [Path(cfg.resume)]:
        try:  # the newest whose metadata reads (without running code); damaged ones: the trainer says why
            meta = read_metadata(checkpoint).state_dict_metadata
            break
        except DamagedCheckpoint:
            continue
    if meta is None:
        return  # no checkpoint that loads: the trainer says so itself
    saved = {k.removeprefix("model."): getattr(v, "size", None) for k, v in meta.items() if k.startswith("model.")}
    lora_a = {k: size for k, size in saved.items() if ".lora_A." in k}
    saved_rank = next(iter(lora_a.values()))[0] if lora_a else 0
    ours = {n for n, _ in model.named_parameters()}
    where = f"checkpoint {checkpoint}"
    if saved_rank and not cfg.lora_rank:
        raise ConfigError(f"{where} was trained with LoRA (rank {saved_rank}); resume it with --lora_rank "
                          f"{saved_rank} and the same --lora_targets")
    if cfg.lora_rank and not saved_rank:
        raise ConfigError(f"{where} is a full fine-tuning checkpoint; resume it without --lora_rank")
    if cfg.lora_rank and saved_rank != cfg.lora_rank:
        raise ConfigError(f"{where} was trained with --lora_rank {saved_rank}, not {cfg.lora_rank}; "
                          f"resume it with --lora_rank {saved_rank}")
    missing = sorted(ours - set(saved))
    if cfg.lora_rank and missing:
        adapted = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in lora_a})
        raise ConfigError(f"{where} has LoRA on other layers ({', '.join(adapted)}; this run lacks "
                          f"{missing[0]}); resume it with --lora_targets {','.join(adapted)}")


def load_for_export(model: nn.Module, hf_config: Path):
    """If the run trained LoRA (hf_config/adapter_config.json), inject the same adapters into this
    freshly built model, so the checkpoint loads into it; returns the PeftModel, or None."""
    if not (hf_config / ADAPTER_CONFIG).is_file():
        return None
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        from .model import ModelError
        raise ModelError(f"{hf_config.parent} is a LoRA run: exporting it needs the peft package; "
                         "pip install peft (or 'vitboost[lora]')") from None
    config = LoraConfig.from_pretrained(str(hf_config))
    base = config.base_model_name_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def export_lora(peft_model, adapter_out: Path | None = None) -> nn.Module:
    """The adapter alone to adapter_out (adapter_config.json + adapter_model.safetensors, for
    ``PeftModel.from_pretrained(base, adapter_out)``), and the merged plain model, returned."""
    if adapter_out is not None:
        peft_model.save_pretrained(str(adapter_out))
    merged = peft_model.merge_and_unload()
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged
