"""scripts/run_demo.sh picks its layout from the GPUs it sees and refuses one that does not fit."""
from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO

FAKE_PYTHON = """#!/bin/bash
if [[ "$*" == *device_count* ]]; then echo $FAKE_GPUS; else echo "would run: python3 $*"; fi
"""


def demo(tmp_path, gpus: int, **env: str) -> subprocess.CompletedProcess:
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "python3").write_text(FAKE_PYTHON)
    (shim / "python3").chmod(0o755)
    full = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "FAKE_GPUS": str(gpus), **env}
    return subprocess.run(["bash", "scripts/run_demo.sh"], cwd=REPO, env=full, capture_output=True, text=True)


def test_two_gpus_run_the_reference_layout_pipeline_parallel(tmp_path):
    r = demo(tmp_path, 2)
    assert r.returncode == 0 and "--nproc_per_node 2" in r.stdout and "--pp_size 2" in r.stdout
    assert "--config configs/beans_scratch.yaml" in r.stdout  # offline: the from-scratch recipe


def test_a_layout_needing_more_gpus_is_refused_with_one_line(tmp_path):
    r = demo(tmp_path, 2, TP="2", PP="2")
    assert r.returncode == 1 and "needs 4 GPUs" in r.stderr and "only 2 are visible" in r.stderr


def test_one_gpu_without_an_explicit_layout_drops_pipeline_parallel(tmp_path):
    r = demo(tmp_path, 1)
    assert r.returncode == 0 and "would run: python3 -m vitboost train" in r.stdout and "--pp_size 1" in r.stdout
    assert "torch.distributed.run" not in r.stdout  # one process, launched directly
    assert demo(tmp_path, 1, PP="2").returncode == 1


def test_pretrained_model_runs_the_reference_recipe(tmp_path):
    r = demo(tmp_path, 2, MODEL="google/vit-base-patch16-224")
    for flag in ("--model google/vit-base-patch16-224", "--batch_size 16", "--lr 2e-4", "--epochs 3",
                 "--weight_decay 0.05", "--warmup_ratio 0.3", "--pp_size 2"):
        assert flag in r.stdout, flag


def test_no_gpu_runs_the_small_cpu_demo(tmp_path):
    r = demo(tmp_path, 0)
    assert r.returncode == 0 and "--device cpu" in r.stdout and "--model vit-tiny" in r.stdout
