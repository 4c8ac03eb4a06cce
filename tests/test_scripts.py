"""scripts/run_demo.sh picks its layout from the GPUs it sees and refuses one that does not fit.

A fake nvidia-smi and python3 stand in for the host's: they report FAKE_GPUS and print what would run."""
from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO

FAKE_PYTHON = """#!/bin/bash
if [[ "$*" == *device_count* ]]; then echo asked >> $TORCH_ASKED; echo $FAKE_GPUS
elif [[ "$*" == *"import json"* ]] || [[ "$*" == *round* ]]; then echo 1.0
else echo "would run: python3 $*"; fi
"""
FAKE_NVIDIA_SMI = """#!/bin/bash
[ "$FAKE_GPUS" -gt 0 ] && seq 0 $(( FAKE_GPUS - 1 ))
"""


def demo(tmp_path, gpus: int, nvidia_smi: bool = True, **env: str) -> subprocess.CompletedProcess:
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    for name, text in (("python3", FAKE_PYTHON), ("nvidia-smi", FAKE_NVIDIA_SMI if nvidia_smi else "exit 127")):
        (shim / name).write_text(text)
        (shim / name).chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # the host's own must not leak in
    full.update(PATH=f"{shim}:{os.environ['PATH']}", FAKE_GPUS=str(gpus), TORCH_ASKED=str(tmp_path / "torch_asked"),
                **env)
    return subprocess.run(["bash", "scripts/run_demo.sh"], cwd=REPO, env=full, capture_output=True, text=True)


def test_two_gpus_run_the_reference_layout_pipeline_parallel(tmp_path):
    r = demo(tmp_path, 2)
    assert r.returncode == 0 and "-m vitboost launch --nproc_per_node 2 train" in r.stdout and "--pp_size 2" in r.stdout
    assert "--config configs/beans_scratch.yaml" in r.stdout  # offline: the from-scratch recipe


def test_a_layout_needing_more_gpus_is_refused_with_one_line(tmp_path):
    r = demo(tmp_path, 2, TP="2", PP="2")
    assert r.returncode == 1 and "needs 4 GPUs" in r.stderr and "only 2 are visible" in r.stderr


def test_one_gpu_without_an_explicit_layout_drops_pipeline_parallel(tmp_path):
    r = demo(tmp_path, 1)
    assert r.returncode == 0 and "would run: python3 -m vitboost train" in r.stdout and "--pp_size 1" in r.stdout
    assert "vitboost launch" not in r.stdout  # one process, started directly: no torchrun agent
    assert demo(tmp_path, 1, PP="2").returncode == 1


def test_pretrained_model_runs_the_reference_recipe(tmp_path):
    r = demo(tmp_path, 2, MODEL="google/vit-base-patch16-224")
    for flag in ("--model google/vit-base-patch16-224", "--batch_size 16", "--lr 2e-4", "--epochs 3",
                 "--weight_decay 0.05", "--warmup_ratio 0.3", "--pp_size 2"):
        assert flag in r.stdout, flag


def test_no_gpu_runs_the_small_cpu_demo(tmp_path):
    r = demo(tmp_path, 0)
    assert r.returncode == 0 and "--device cpu" in r.stdout and "--model vit-tiny" in r.stdout
    assert "-m vitboost launch --nproc_per_node 2 train" in r.stdout  # two processes, pp=2


def test_gpus_are_counted_without_importing_torch_and_cuda_visible_devices_narrows_them(tmp_path):
    r = demo(tmp_path, 2, CUDA_VISIBLE_DEVICES="1")
    assert r.returncode == 0 and "one GPU found" in r.stdout and "--pp_size 1" in r.stdout
    assert not (tmp_path / "torch_asked").exists()  # nvidia-smi answered: no ~2 s torch import first
    assert "--device cpu" in demo(tmp_path, 2, CUDA_VISIBLE_DEVICES="").stdout
    r = demo(tmp_path, 2, nvidia_smi=False)  # no nvidia-smi: torch counts
    assert "--nproc_per_node 2" in r.stdout and (tmp_path / "torch_asked").exists()
