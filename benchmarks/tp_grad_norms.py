"""A tensor-parallel run's logged losses and gradient norms beside one process's, step by step (CPU, gloo).

Tells rounding (a difference that starts near fp32 precision and grows through Adam) from a wrong
gradient (a difference from step 1). BENCHMARKS.md section 28 ran it on torch 2.11:

    python benchmarks/tp_grad_norms.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.conftest import make_imagefolder  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.test_strategies import _train, base  # noqa: E402


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"grad_norm"' in line]


def main() -> None:
    from transformers import ViTConfig
    tmp = Path(tempfile.mkdtemp())
    data = make_imagefolder(tmp / "beans", {"train": 8, "validation": 3, "test": 2})
    ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(tmp / "vit4")
    one, tp = tmp / "one" / "run", tmp / "tp2" / "run"
    run_distributed(_train, 1, base(data, tmp / "vit4", one))
    run_distributed(_train, 2, base(data, tmp / "vit4", tp, plugin="hybrid_parallel", tp_size=2))
    print("step  loss (one / tp2)  grad norm (one / tp2)  relative difference of the norms")
    for a, b in zip(logged(one), logged(tp)):
        print(f"{a['step']:4d}  {a['loss']:.6f} / {b['loss']:.6f}  {a['grad_norm']:.6f} / {b['grad_norm']:.6f}  "
              f"{abs(a['grad_norm'] - b['grad_norm']) / a['grad_norm']:.1e}")


if __name__ == "__main__":
    main()
