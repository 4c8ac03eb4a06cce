"""What the CLI's imports cost: `import torch`, then transformers' ViT modeling code, plainly or the way
the CLI loads it (`import_transformers_lean`: scikit-learn, scipy and torchvision reported absent).
Each measurement is a fresh process; the two ways alternate, so machine noise hits both alike.

    python benchmarks/import_time.py --repeat 3        # BENCHMARKS.md section 21

Run it with Python's bytecode cached (a pip install has it), or every process compiles every module.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
if sys.argv[1] == "lean":
    from vitboost.model import import_transformers_lean
    import_transformers_lean()
else:
    from transformers import ViTForImageClassification
t2 = time.perf_counter()
extras = [m for m in ("sklearn", "scipy", "torchvision") if m in sys.modules]
print(f'{{"way": "{sys.argv[1]}", "torch_s": {t1 - t0:.2f}, "transformers_s": {t2 - t1:.2f}, "extras": "{",".join(extras)}"}}')
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    rows = []
    for _ in range(a.repeat):
        for way in ("plain", "lean"):
            out = subprocess.run([sys.executable, "-c", CHILD, way], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for way in ("plain", "lean"):
        t = [r["torch_s"] + r["transformers_s"] for r in rows if r["way"] == way]
        print(f"{way}: torch + transformers' ViT {sum(t) / len(t):.2f} s (mean of {len(t)})")


if __name__ == "__main__":
    main()
