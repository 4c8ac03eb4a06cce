"""Faults and hostile input (issue 12): damaged checkpoints, full disks, preemption, untrusted files.

Each fault ends in one clear line, loses nothing that was good, and runs no code from the files.
The numbers in the section titles are the issue's points.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO, train_args
from tests.distributed import free_port
from tests.test_cli_errors import fails_with
from tests.test_launch import torchrun, train_flags
from tests.test_strategies import assert_params_close
from vitboost.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
STEP = "step_{:08d}".format


@pytest.fixture(scope="module")
def reference(tiny_beans, tmp_path_factory) -> Path:
    """An unbroken 6-step run (3 steps per epoch) keeping its checkpoints of steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(tiny_beans, out, *KEEP_ALL)) == 0
    return out


KEEP_ALL = ("--save_every", "2", "--keep_checkpoints", "0", "--no-async_checkpoint")


def copy_run(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "model")
    return run


def rows(run: Path) -> list[dict]:
    """metrics.jsonl without the timing column."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("img_per_s", None)
        out.append(row)
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------------------- 2. paths that cannot be created

def test_output_under_a_file_is_refused_before_any_work(capsys, tiny_beans, tmp_path):
    (tmp_path / "file").write_text("x")
    fails_with(capsys, train_args(tiny_beans, tmp_path / "file" / "run"), "--output", "is a file")


def test_read_only_output_is_refused_in_one_line(capsys, tiny_beans, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    else:  # root writes through chmod: report the folder as a read-only mount would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else access(p, mode, **kw))
    try:
        fails_with(capsys, train_args(tiny_beans, ro / "run"), str(ro), "pass a folder you can write to")
    finally:
        ro.chmod(0o755)


def test_an_output_folder_the_system_refuses_to_create_ends_in_one_line_naming_it(capsys, tiny_beans, tmp_path,
                                                                                   monkeypatch):
    target = tmp_path / "run"
    mkdir = Path.mkdir

    def refuse(self, *a, **kw):
        if self == target:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", refuse)
    fails_with(capsys, train_args(tiny_beans, target), str(target), "Read-only file system", "read-only")


def test_a_cache_dir_that_cannot_be_created_costs_the_cache_not_the_run(capsys, tiny_beans, tmp_path):
    (tmp_path / "file").write_text("x")
    args = train_args(tiny_beans, tmp_path / "run", "--epochs", "1")
    args[args.index("--cache_dir") + 1] = str(tmp_path / "file" / "cache")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cannot write the cache" in out and "Not a directory" in out and "going on without it" in out
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_full_disk_while_caching_the_data_costs_the_cache_not_the_run(tiny_beans, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    save = torch.save

    def full(obj, f, *a, **kw):
        if isinstance(obj, dict) and "fingerprint" in obj:  # the data cache
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    assert main(train_args(tiny_beans, tmp_path / "run", "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert f"cannot write the cache {cache}" in out and "No space left on device" in out
    assert list(cache.iterdir()) == []  # no half-written cache file
