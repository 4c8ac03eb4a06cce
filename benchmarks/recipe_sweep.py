"""From-scratch beans recipes x seeds, several runs sharing each GPU, and the seed table.

    python benchmarks/recipe_sweep.py --recipes benchmarks/recipes.txt --seeds 42 43 44 --out results/sweep

Each line of the recipes file is `name <vitboost train flags...>` (# starts a comment). Runs go
to --runs/<name>/seed_<s> (checkpoints stay there); each run's summary.json and log are copied
to --out/<name>/seed_<s>/. Runs share the GPUs (--parallel at a time, round-robin over the
visible GPUs), so their train_seconds are NOT speed numbers: accuracy is what this measures.
The table: validation and test accuracy per seed, their mean and minimum per recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_recipes(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, *flags = line.split()
            out.append((name, flags))
    return out


def gpus() -> int:
    try:
        import torch
        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=str(ROOT / "benchmarks" / "recipes.txt"))
    p.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    p.add_argument("--parallel", type=int, default=4, help="runs at a time (they share the GPUs)")
    p.add_argument("--out", default="results/sweep")
    p.add_argument("--runs", default="/tmp/vitboost_sweep")
    p.add_argument("--cache_dir", default="/tmp/vitboost_cache")
    p.add_argument("--dataset", default=str(ROOT / "data" / "beans"))
    p.add_argument("--extra", default="", help='flags added to every run, e.g. --extra="--compile false"')
    p.add_argument("--json", help="also write every finished run (recipe, seed, accuracies, seconds) here")
    a = p.parse_args()
    recipes = [r for r in read_recipes(Path(a.recipes)) if not a.only or r[0] in a.only]
    jobs = [(name, flags, seed) for name, flags in recipes for seed in a.seeds]
    out, n_gpu = Path(a.out), gpus()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    running: list[tuple[subprocess.Popen, str, int, Path]] = []

    def reap(block: bool) -> None:
        while running and (block or any(pr.poll() is not None for pr, *_ in running)):
            for item in list(running):
                pr, name, seed, run = item
                if pr.poll() is None:
                    continue
                running.remove(item)
                dst = out / name / f"seed_{seed}"
                dst.mkdir(parents=True, exist_ok=True)
                for f in ("summary.json", "train.log"):
                    if (run / f).exists():
                        shutil.copy(run / f, dst / f)
                print(f"done {name} seed {seed} rc={pr.returncode}", flush=True)
            if block and running:
                time.sleep(1)

    def stop(*_):  # killed by a time limit: stop the runs too, then report what finished
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    def launch(name: str, flags: list[str], seed: int, slot: int) -> None:
        while len(running) >= a.parallel:
            reap(False)
            time.sleep(1)
        run = Path(a.runs) / name / f"seed_{seed}"
        run.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "vitboost", "train", "--dataset", a.dataset, "--output", str(run), "--overwrite",
               "--cache_dir", a.cache_dir, "--no-progress", "--seed", str(seed), *flags]
        log = open(run / "train.log", "w")
        pr = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**env, "CUDA_VISIBLE_DEVICES": str(slot % n_gpu)})
        running.append((pr, name, seed, run))
        print(f"start {name} seed {seed}: {' '.join(flags)}", flush=True)
    try:
        for slot, (name, flags, seed) in enumerate(jobs):
            launch(name, flags + a.extra.split(), seed, slot)
        reap(True)
    except KeyboardInterrupt:
        for pr, *_rest in running:
            pr.terminate()
        for pr, *_rest in running:
            pr.wait(timeout=30)  # their GPU memory is free before anything else runs
        print("stopped: unfinished runs were terminated", flush=True)
    print(table(out, recipes, a.seeds))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(collect(out, recipes, a.seeds), indent=1))


def collect(out: Path, recipes: list[tuple[str, list[str]]], seeds: list[int]) -> list[dict]:
    rows = []
    for name, flags in recipes:
        for seed in seeds:
            f = out / name / f"seed_{seed}" / "summary.json"
            if f.exists():
                s = json.loads(f.read_text())
                rows.append({"recipe": name, "seed": seed, "flags": " ".join(flags),
                             **{k: s["eval"][k]["accuracy"] for k in s.get("eval", {})},
                             "train_seconds": s.get("train_seconds"), "total_seconds": s.get("total_seconds"),
                             "teacher": s.get("teacher"), "history": s.get("history")})
    return rows


def table(out: Path, recipes: list[tuple[str, list[str]]], seeds: list[int]) -> str:
    lines = ["| recipe | seeds | validation per seed | test per seed | val mean / min | test mean / min |",
             "|---|---|---|---|---|---|"]
    for name, _ in recipes:
        val, test = [], []
        for seed in seeds:
            f = out / name / f"seed_{seed}" / "summary.json"
            if f.exists():
                ev = json.loads(f.read_text()).get("eval", {})
                val.append(ev.get("validation", {}).get("accuracy", float("nan")))
                test.append(ev.get("test", {}).get("accuracy", float("nan")))
        if not test:
            lines.append(f"| {name} | 0 | failed | | | |")
            continue
        fmt = lambda xs: " ".join(f"{x:.4f}" for x in xs)  # noqa: E731
        lines.append(f"| {name} | {len(test)} | {fmt(val)} | {fmt(test)} | {statistics.mean(val):.4f} / {min(val):.4f} | "
                     f"{statistics.mean(test):.4f} / {min(test):.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
