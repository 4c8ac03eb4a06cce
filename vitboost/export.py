"""Export: a run's weights as an HF save_pretrained folder (safetensors), from a checkpoint or from memory.

``vitboost export`` and runs under a sharded layout (FSDP, tensor or pipeline parallel) rebuild the
model from a checkpoint (:func:`export_checkpoint`); a run whose model is one unsharded module hands
its weights over in memory when it ends (:func:`export_state`), without reading back the checkpoint it
just wrote. Both build the same model (no random init, the run's LoRA adapters injected) and write it
through the same code, so the two folders are bitwise the same.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import lora
from .model import ModelError, Preprocess, export_pretrained, read_preprocess


def export_checkpoint(checkpoint: Path, out: Path, adapter: Path | None = None, log=print) -> Path:
    """A run folder (its newest checkpoint that loads, saying which it skipped) or one step_* folder
    -> HF folder with safetensors, written to a temporary name and renamed. A LoRA run is merged into
    plain weights; ``adapter`` also gets the adapter alone; a run with --ema exports its EMA weights."""
    from .checkpoint import CheckpointError, DamagedCheckpoint, candidates, load_model_weights
    one = (checkpoint / ".metadata").exists() or not (checkpoint / "checkpoints").is_dir()
    steps = [checkpoint] if one else candidates(checkpoint / "checkpoints")
    if not steps:
        raise ModelError(f"{checkpoint} holds no checkpoint; pass a run folder or one of its "
                         f"checkpoints/step_* folders")
    run = steps[0].parent.parent
    hf = _hf_config(run, f"is {checkpoint} a vitboost run or one of its checkpoints/step_* folders?")
    model = peft_model = None
    skipped: list[str] = []
    for step in steps:
        try:
            model, peft_model = _build(hf)
            load_model_weights(step, model, ema=_run_uses_ema(run))
            break
        except DamagedCheckpoint as e:
            if one:
                raise CheckpointError(f"cannot export {step}: {e.reason}; pass another checkpoint folder, or the "
                                      f"run folder to take its newest checkpoint that loads") from None
            log(f"export: skipping {step}: {e.reason}")
            skipped.append(f"{step.name}: {e.reason}")
            model = None
    if model is None:
        raise CheckpointError(f"no checkpoint in {checkpoint / 'checkpoints'} can be loaded "
                              f"({'; '.join(skipped[:3])})")
    return _write(model, peft_model, hf, out, adapter, step)


def export_state(run: Path, state: dict[str, torch.Tensor], out: Path, adapter: Path | None = None,
                 checkpoint: Path | None = None) -> Path:
    """The weights of a run that just ended, handed over in memory (the model's state dict; for --ema,
    taken with the EMA swapped in) -> the same HF folder as :func:`export_checkpoint` of its last
    checkpoint. ``checkpoint``: that checkpoint, named if the write fails."""
    hf = _hf_config(run, "is it a vitboost run folder?")
    model, peft_model = _build(hf)
    model.load_state_dict(state)  # strict: the same module tree as the run's, key for key
    return _write(model, peft_model, hf, out, adapter, checkpoint)


def _hf_config(run: Path, hint: str) -> Path:
    hf = run / "hf_config"
    if not (hf / "config.json").is_file():
        raise ModelError(f"{run} has no hf_config/config.json (written at the start of every run); {hint}")
    return hf


def _build(hf: Path):
    """The run's model, uninitialized, with its LoRA adapters when it trained some: (model, PeftModel or None)."""
    from transformers import ViTConfig, ViTForImageClassification
    model = _uninitialized(ViTForImageClassification, ViTConfig.from_pretrained(hf))
    return model, lora.load_for_export(model, hf)


def _write(model, peft_model, hf: Path, out: Path, adapter: Path | None, checkpoint: Path | None) -> Path:
    """Merge LoRA (the adapter alone to ``adapter``), then write the HF folder; a storage failure is one
    WriteError line that names the checkpoint to export later."""
    from .storage import WriteError, io_failure
    if adapter is not None and peft_model is None:
        raise ModelError(f"{hf.parent} is not a LoRA run (no hf_config/adapter_config.json); export it without --adapter")
    if peft_model is not None:
        model = lora.export_lora(peft_model, adapter)
    try:
        export_pretrained(model, read_preprocess(hf, model.config.image_size), out)
    except Exception as e:  # noqa: BLE001 - a storage failure becomes one line, anything else is re-raised
        reason = io_failure(e, out)
        if reason is None:
            raise
        shutil.rmtree(out.with_name(out.name + ".tmp"), ignore_errors=True)
        source = checkpoint or hf.parent
        raise WriteError(f"cannot write the exported model to {out} ({reason}); the checkpoint {source} is intact: "
                         f"free some space, then `vitboost export --checkpoint {source} --output {out}`") from None
    return out


def _uninitialized(cls, config):
    """The model's modules without HF's random init (~1-5 s for ViT-B on a CPU): every weight is
    loaded right after (from the checkpoint or the run's memory), and a missing one fails that strict load."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return cls(config)


def _run_uses_ema(run: Path) -> bool:
    """The run's resolved config says whether it kept a weight EMA (then the EMA is the model)."""
    import yaml
    cfg = run / "config.yaml"
    return cfg.is_file() and float((yaml.safe_load(cfg.read_text()) or {}).get("ema") or 0) > 0


def save_run_config(model, pre: Preprocess, run: Path) -> None:
    """The HF config + preprocessing of a run, so any checkpoint of it can be exported later."""
    export_dir = run / "hf_config"
    export_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(export_dir)
    lora.save_config(model, export_dir)
    (export_dir / "preprocessor_config.json").write_text(json.dumps(pre.to_hf(), indent=2))
