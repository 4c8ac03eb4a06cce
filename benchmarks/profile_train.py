"""Where a training run's step time goes, on a GPU: ``vitboost train`` with a probe around the step.

    python benchmarks/profile_train.py train --config configs/beans_scratch.yaml --dataset data/beans \
        --epochs 60 --output /tmp/prof --overwrite --no-progress

Prints (line ``PROFSTEP``) the loop's wall ms per step over steps 200-280 and, when the step is a
CUDA graph, the replay alone (GPU time of the step); then torch.profiler tables (by CUDA and by CPU
time) over steps 300-340. The run needs >= 340 steps. BENCHMARKS.md section 20.
"""
from __future__ import annotations

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import vitboost.engine as engine_mod

_step = engine_mod.Engine.train_step
_count = {"i": 0, "t": 0.0}
_prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


def probed(self, micro_batches):
    _count["i"] += 1
    i = _count["i"]
    if i == 200:
        torch.cuda.synchronize()
        _count["t"] = time.perf_counter()
    if i == 280:
        torch.cuda.synchronize()
        out = {"loop_ms_per_step": round((time.perf_counter() - _count["t"]) / 80 * 1e3, 2)}
        if self.graphed is not None and self.graphed.graph is not None:
            t = time.perf_counter()
            for _ in range(50):
                self.graphed.graph.replay()
            torch.cuda.synchronize()
            out["replay_only_ms"] = round((time.perf_counter() - t) / 50 * 1e3, 2)
        print("PROFSTEP", json.dumps(out), flush=True)
    if i == 300:
        _prof.__enter__()
    result = _step(self, micro_batches)
    if i == 340:
        torch.cuda.synchronize()
        _prof.__exit__(None, None, None)
        for key in ("cuda_time_total", "cpu_time_total"):
            print(_prof.key_averages().table(sort_by=key, row_limit=35, max_name_column_width=60), flush=True)
    return result


if __name__ == "__main__":
    engine_mod.Engine.train_step = probed
    from vitboost.cli import main
    sys.exit(main(sys.argv[1:]))
