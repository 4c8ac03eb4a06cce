"""The training step at the sizes users train, every speed choice side by side, one GPU.

    python benchmarks/step_speed.py --json results/step_speed.json                 # the default table
    python benchmarks/step_speed.py --cases vit-base:16 --variants eager graph compile+graph

A case is MODEL[@SIZE[/PATCH]]:BATCH[:PRECISION[:PLUGIN]][=VARIANT,VARIANT...]; a variant says what `vitboost bench` is asked for:
  eager           --compile false --cuda_graph false
  graph           --compile false --cuda_graph true
  compile         --compile true  --cuda_graph false   (the whole model under one process)
  compile+graph   --compile true  --cuda_graph true
  blocks[+graph]  --compile blocks (each block compiled: one graph shared by all blocks) [--cuda_graph true]
  auto            the defaults (what `vitboost train` picks for a long run)
  peers           HF eager / compiled, timm compiled / one CUDA graph (the anchor), same batch
  peer:NAME       one of those peers (hf_eager, hf_compile, timm_compile, timm_cudagraph)
Each case runs in its own process (one CUDA context, one compile cache), variants in the
order given; every row lands in --json as it is measured, so a crash keeps what came before.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ["vit-base:16", "vit-base:32", "vit-small:128", "vit-base:256"]
DEFAULT_VARIANTS = ["eager", "graph", "compile", "compile+graph", "peers"]
FLAGS = {"eager": ["--compile", "false", "--cuda_graph", "false"],
         "graph": ["--compile", "false", "--cuda_graph", "true"],
         "compile": ["--compile", "true", "--cuda_graph", "false"],
         "compile+graph": ["--compile", "true", "--cuda_graph", "true"],
         "blocks": ["--compile", "blocks", "--cuda_graph", "false"],
         "blocks+graph": ["--compile", "blocks", "--cuda_graph", "true"],
         "auto": []}


def run_case(case: str, variants: list[str], out: Path, steps: int, warmup: int) -> None:
    """In this process: one `vitboost bench` per variant, rows appended to out (JSON lines)."""
    from vitboost.cli import main
    model, batch, *rest = case.split(":")
    precision = rest[0] if rest else "bf16"
    plugin = rest[1] if len(rest) > 1 else "torch_ddp"
    model, _, size = model.partition("@")  # vit-small@160 or vit-small@112/8: image size / patch size
    shape = ["--image_size", size.split("/")[0]] + (["--patch_size", size.split("/")[1]] if "/" in size else [])
    base = ["bench", "--model", model, "-b", batch, "--mixed_precision", precision, "--plugin", plugin,
            "--num_labels", "3", "--steps", str(steps), "--warmup", str(warmup), *(shape if size else [])]
    for variant in variants:
        tmp = out.with_suffix(f".{os.getpid()}.json")
        peers = variant == "peers" or variant.startswith("peer:")
        args = base + (["--compile", "false", "--cuda_graph", "false", "--peers", *variant.split(":")[1:]] if peers
                       else FLAGS[variant]) + ["--json", str(tmp)]
        print(f"== {case} {variant}", flush=True)
        try:
            rc = main(args)
        except Exception as e:  # keep the other variants' numbers
            print(f"!! {case} {variant} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        if rc == 0 and tmp.exists():
            rows = json.loads(tmp.read_text())
            rows = rows[1:] if peers else rows
            with out.open("a") as f:
                for r in rows:
                    f.write(json.dumps({"case": case, "variant": r["name"] if peers else variant, **r}) + "\n")
            tmp.unlink()


def table(rows: list[dict]) -> str:
    lines = ["| case | variant | img/s | step ms | warm-up s | peak GiB | loss |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['variant']} | {r['img_per_s']:.0f} | {r['step_time_ms']:.2f} | "
                     f"{r['warmup_s']} | {r['peak_gib_per_gpu']} | {r['loss']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--json", default="results/step_speed.jsonl", help="rows as JSON lines (appended)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case (a hang loses one case, not all)")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    a = p.parse_args()
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a._case:
        sys.path.insert(0, str(ROOT))
        run_case(a._case, a.variants, out, a.steps, a.warmup)
        return
    start = sum(1 for _ in out.open()) if out.exists() else 0
    for case in a.cases:
        variants = case.split("=")[1].split(",") if "=" in case else a.variants  # CASE=v1,v2 overrides
        try:
            subprocess.run([sys.executable, __file__, "--_case", case.split("=")[0], "--variants", *variants,
                            "--steps", str(a.steps), "--warmup", str(a.warmup), "--json", str(out)], cwd=ROOT,
                           timeout=a.timeout)
        except subprocess.TimeoutExpired:
            print(f"!! {case}: over {a.timeout} s, stopped", flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()[start:]]
    print(table(rows))


if __name__ == "__main__":
    main()
