"""The distillation teacher (resnet-small, 160 px) per memory layout, one GPU: its forward over a chunk of
1,024 images without grad (what the student's input path runs) and its training step at batch 128, and
the 7x7 stem convolution alone three ways (cuDNN channels-last, cuDNN NCHW, unfold + GEMM). One line:

    python benchmarks/teacher_forward.py

BENCHMARKS.md section 24: channels-last as trained is the fastest of these; the teacher is unchanged.
"""
from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F

from vitboost.model import import_transformers_lean


def timeit(f, n: int = 20) -> float:
    for _ in range(3):
        f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        f()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / n, 3)


def nchw_stem(model):
    """Only the stem convolution in NCHW (its 3 input channels), the rest channels-last."""
    conv = model.resnet.embedder.embedder.convolution
    conv.weight = torch.nn.Parameter(conv.weight.detach().contiguous())
    forward = conv.forward
    conv.forward = lambda t: forward(t.contiguous()).contiguous(memory_format=torch.channels_last)
    return model


def main() -> dict:
    import_transformers_lean()
    from vitboost.distill import _named
    from vitboost.predict import forward_logits
    dev = torch.device("cuda")
    base = _named("resnet-small", 3, dev, 0)
    x = torch.randn(1024, 3, 160, 160, device=dev)
    last = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    variants = {"channels_last": (base, last), "stem_nchw": (nchw_stem(copy.deepcopy(base)), last),
                "all_nchw": (copy.deepcopy(base).to(memory_format=torch.contiguous_format), lambda t: t.contiguous())}
    out = {}
    xb, yb = x[:128], torch.softmax(torch.randn(128, 3, device=dev), -1)
    for name, (model, layout) in variants.items():
        model.eval()
        with torch.no_grad():
            out[f"{name}_fwd1024"] = timeit(lambda: forward_logits(model, layout(x)))
        model.train()

        def step():
            loss = -(forward_logits(model, layout(xb)).log_softmax(-1) * yb).sum(-1).mean()
            loss.backward()
        out[f"{name}_trainstep128"] = timeit(step)
    w = base.resnet.embedder.embedder.convolution.weight.detach().to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)

    def unfold():
        return (w.reshape(w.shape[0], -1) @ F.unfold(x16, 7, padding=3, stride=2)).view(1024, w.shape[0], 80, 80)
    with torch.no_grad():
        out["conv_nhwc"] = timeit(lambda: F.conv2d(last(x16), last(w), stride=2, padding=3))
        out["conv_nchw"] = timeit(lambda: F.conv2d(x16, w.contiguous(), stride=2, padding=3))
        out["conv_unfold_gemm"] = timeit(unfold)
        out["unfold_max_diff"] = (unfold().float() - F.conv2d(x16, w, stride=2, padding=3).float()).abs().max().item()
    return out


if __name__ == "__main__":
    print("TEACHER", json.dumps(main()), flush=True)
