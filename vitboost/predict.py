"""Using a trained model: predict, evaluate a folder, export a checkpoint. One process, no mesh.

The preprocessing is the training preprocessing (same decode + resize code, same
normalization), so `vitboost predict` and `transformers.pipeline` on the exported folder
agree.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import lora
from .data import decode_image, load_image_dataset, normalize
from .evaluate import evaluate
from .model import ModelError, Preprocess, export_pretrained, read_preprocess


class LocalModel:
    """A plain model on one device, with the two things evaluate() needs: .device and .logits()."""

    def __init__(self, folder: str, device: str = "auto"):
        from transformers import ViTForImageClassification
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {folder} is not a trained model folder (no config.json); "
                             f"pass <output>/model from a run, or export one with `vitboost export`")
        self.model = ViTForImageClassification.from_pretrained(path).to(self.device).eval()
        self.pre = read_preprocess(path, self.model.config.image_size)
        self.label_names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            return self.model(pixel_values=images).logits.float()


class Predictor(LocalModel):
    def predict(self, images: list[str], top_k: int = 3) -> list[dict]:
        rows = []
        for path in images:
            x = decode_image(path, self.pre.image_size, self.pre.resample)[None].to(self.device)
            probs = self.logits(normalize(x, self.pre.mean, self.pre.std)).softmax(-1)[0]
            scores, ids = probs.topk(min(top_k, probs.numel()))
            rows.append({"image": path, "predictions": [{"label": self.label_names[i], "score": round(s, 6)}
                                                        for s, i in zip(scores.tolist(), ids.tolist())]})
        return rows


def evaluate_folder(folder: str, dataset: str, split: str = "all", *, batch_size: int = 64,
                    cache_dir: str | None = None, device: str = "auto") -> dict[str, dict]:
    m = LocalModel(folder, device)
    data = load_image_dataset(dataset, m.pre.image_size, Path(cache_dir).expanduser() if cache_dir else None,
                              resample=m.pre.resample, log=lambda *_: None)
    if data.label_names != m.label_names:
        raise ModelError(f"the model's labels {m.label_names} differ from the dataset's {data.label_names}; "
                         f"evaluate on the dataset it was trained on")
    names = [s for s in ("train", "validation", "test") if s in data.splits] if split == "all" else [split]
    for s in names:
        if s not in data.splits:
            raise ModelError(f"dataset {dataset} has no {s!r} split; choose one of {', '.join(data.splits)}")
    return {s: evaluate(m, data.splits[s], data.label_names, batch_size=batch_size, mean=m.pre.mean, std=m.pre.std)
            for s in names}


def export_checkpoint(checkpoint: Path, out: Path, adapter: Path | None = None, log=print) -> Path:
    """A run folder (its newest checkpoint that loads, saying which it skipped) or one step_* folder
    -> HF folder with safetensors, written to a temporary name and renamed. A LoRA run is merged into
    plain weights; ``adapter`` also gets the adapter alone; a run with --ema exports its EMA weights."""
    import shutil

    from transformers import ViTConfig, ViTForImageClassification

    from .checkpoint import CheckpointError, DamagedCheckpoint, candidates, load_model_weights
    from .storage import WriteError, io_failure
    one = (checkpoint / ".metadata").exists() or not (checkpoint / "checkpoints").is_dir()
    steps = [checkpoint] if one else candidates(checkpoint / "checkpoints")
    if not steps:
        raise ModelError(f"{checkpoint} holds no checkpoint; pass a run folder or one of its "
                         f"checkpoints/step_* folders")
    run = steps[0].parent.parent
    hf = run / "hf_config"
    if not (hf / "config.json").is_file():
        raise ModelError(f"{run} has no hf_config/config.json (written at the start of every run); "
                         f"is {checkpoint} a vitboost run or one of its checkpoints/step_* folders?")
    model = peft_model = None
    skipped: list[str] = []
    for step in steps:
        try:
            model = _uninitialized(ViTForImageClassification, ViTConfig.from_pretrained(hf))
            peft_model = lora.load_for_export(model, hf)
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
    if adapter is not None and peft_model is None:
        raise ModelError(f"{run} is not a LoRA run (no hf_config/adapter_config.json); export it without --adapter")
    if peft_model is not None:
        model = lora.export_lora(peft_model, adapter)
    try:
        export_pretrained(model, read_preprocess(hf, model.config.image_size), out)
    except Exception as e:  # noqa: BLE001 - a storage failure becomes one line, anything else is re-raised
        reason = io_failure(e, out)
        if reason is None:
            raise
        shutil.rmtree(out.with_name(out.name + ".tmp"), ignore_errors=True)
        raise WriteError(f"cannot write the exported model to {out} ({reason}); the checkpoint {step} is intact: "
                         f"free some space, then `vitboost export --checkpoint {step} --output {out}`") from None
    return out


def _uninitialized(cls, config):
    """The model's modules without HF's random init (~1-5 s for ViT-B on a CPU): every weight is
    loaded from the checkpoint right after, and a missing one fails that strict load."""
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
    import json
    (export_dir / "preprocessor_config.json").write_text(json.dumps(pre.to_hf(), indent=2))

