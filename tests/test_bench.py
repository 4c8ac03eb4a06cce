"""`vitboost bench` on CPU: the row schema, and numbers that agree with each other.

Speeds on a shared CPU are noise; what must hold is the bookkeeping: each image counted
once (global_batch = batch x dp), img/s = global_batch / step time, MFU from the FLOP
model, and the peer rows present when asked for.
"""
from __future__ import annotations

import csv
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from vitboost.bench import FIELDS, vit_flops_per_image  # noqa: E402
from vitboost.cli import main  # noqa: E402
from vitboost.model import named_config  # noqa: E402

SMOKE = ["bench", "--model", "vit-micro", "-b", "4", "--steps", "3", "--warmup", "1", "--num_labels", "10",
         "--device", "cpu"]


def _rows(tmp_path, *extra: str) -> list[dict]:
    out = tmp_path / "bench.json"
    assert main([*SMOKE, "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _consistent(row: dict) -> None:
    assert set(row) == set(FIELDS)
    assert row["global_batch"] == row["batch_size"] * row["dp"]
    assert row["world_size"] == row["dp"] * row["tp"] * row["pp"]
    assert row["step_time_ms"] > 0 and row["img_per_s"] > 0
    assert row["img_per_s"] == pytest.approx(row["global_batch"] / (row["step_time_ms"] / 1e3), rel=1e-2)
    assert row["img_per_s_per_gpu"] * row["world_size"] == pytest.approx(row["img_per_s"], rel=1e-2)
    assert row["warmup_s"] > 0
    assert row["loss"] == row["loss"]  # not NaN


def test_flops_match_the_vit_b16_reference():
    assert vit_flops_per_image(named_config("vit-base", 1000)) / 1e9 == pytest.approx(105.4, rel=2e-3)


def test_bench_cpu_smoke(tmp_path):
    table = tmp_path / "bench.csv"
    rows = _rows(tmp_path, "--csv", str(table), "--peak_tflops", "1")
    assert [r["name"] for r in rows] == ["vitboost"]
    row = rows[0]
    _consistent(row)
    assert (row["model"], row["plugin"], row["precision"], row["world_size"]) == ("vit-micro", "torch_ddp", "fp32", 1)
    assert row["global_batch"] == 4 and row["steps"] == 3 and row["warmup"] == 1
    assert row["peak_gib_per_gpu"] is None and row["host_rss_gib"] > 0  # CPU: no device memory
    # mfu = FLOPs/image x img/s / (peak x world); 1 TFLOP/s peak given, so mfu == achieved TFLOP/s
    assert row["mfu"] == pytest.approx(row["tflops_per_gpu"], rel=1e-2, abs=1e-4)
    assert row["tflops_per_gpu"] == pytest.approx(row["gflop_per_image"] * row["img_per_s"] / 1e3, rel=1e-2)
    with table.open(newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 1 and lines[0]["name"] == "vitboost" and list(lines[0]) == list(FIELDS)


def test_bench_peers(tmp_path):
    rows = _rows(tmp_path, "--peers")
    names = [r["name"] for r in rows]
    assert names == ["vitboost", "hf_eager"]  # on CPU; compiled and graphed peers are GPU rows
    for row in rows:
        _consistent(row)
        assert row["mfu"] is None  # no peak FLOP/s on CPU unless given
        assert row["global_batch"] == 4 and row["gflop_per_image"] == rows[0]["gflop_per_image"]


def test_bad_steps_is_a_one_line_error(capsys):
    assert main([*SMOKE, "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_bench_lora_trains_a_fraction_of_the_parameters_and_keeps_less_state(tmp_path):
    pytest.importorskip("peft")
    full, = _rows(tmp_path)
    lora, = _rows(tmp_path, "--lora_rank", "2")
    _consistent(lora)
    assert full["trainable_params"] == full["params"]
    # adapters (rank 2 on 6 linears per block) and the 10-class head: a small part of the model
    assert 0 < lora["trainable_params"] < 0.2 * lora["params"] and lora["params"] > full["params"]
    assert lora["state_gib_per_rank"] < full["state_gib_per_rank"]  # no grads or Adam states for the base
    assert "+lora r2" in lora["strategy"]
