"""Using a trained model: predict, evaluate a folder. One process, no mesh.

The preprocessing is the training preprocessing (same decode + resize code, same
normalization), so `vitboost predict` and `transformers.pipeline` on the exported folder
agree.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import decode_image, load_image_dataset, normalize
from .evaluate import evaluate
from .model import ModelError, class_token_last_block, fuse_qkv, low_precision_residual_stream, read_preprocess


def forward_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """fp32 logits of an HF image classifier, under bf16 autocast on a GPU."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        return model(pixel_values=images).logits.float()


class OnDevice:
    """A plain model on one device, with the two things evaluate() needs: .device and .logits()."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, images)


class LocalModel(OnDevice):
    """A trained model folder (an export), on one device, with its preprocessing and label names."""

    def __init__(self, folder: str, device: str = "auto"):
        from transformers import ViTForImageClassification
        device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                              "cpu" if device == "auto" else device)
        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {folder} is not a trained model folder (no config.json); "
                             f"pass <output>/model from a run, or export one with `vitboost export`")
        super().__init__(ViTForImageClassification.from_pretrained(path).to(device).eval(), device)
        # the forward the trainer evaluated with: q, k, v as one GEMM, the last block for the CLS token only,
        # the residual stream in bf16 on a GPU
        fuse_qkv(self.model)
        class_token_last_block(self.model)
        low_precision_residual_stream(self.model)
        self.pre = read_preprocess(path, self.model.config.image_size)
        self.label_names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]


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
