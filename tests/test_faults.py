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
from tests.test_launch import torchrun, train_flags, vitboost_launch
from tests.test_strategies import assert_params_close
from vitboost.checkpoint import WRITE_THREADS
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


# ---------------------------------------------------------------------------- 1. damaged checkpoints

def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


LAST_SHARD = f"__0_{WRITE_THREADS - 1}.distcp"
DAMAGE = {  # what is done to the newest checkpoint, what the skip line says, whether export reads it
    "shard missing": (lambda c: (c / "__0_0.distcp").unlink(), "shard __0_0.distcp is missing", True),
    "shard truncated": (lambda c: _truncate(c / "__0_0.distcp"), "shard __0_0.distcp is truncated", True),
    # a rank's shard is written as several files (checkpoint.WRITE_THREADS): the last one is checked too
    "last shard file missing": (lambda c: (c / LAST_SHARD).unlink(), f"shard {LAST_SHARD} is missing", True),
    "metadata empty": (lambda c: (c / ".metadata").write_bytes(b""), ".metadata is empty", True),
    "metadata truncated": (lambda c: _truncate(c / ".metadata"), ".metadata is truncated", True),
    "trainer.pt truncated": (lambda c: _truncate(c / "trainer.pt"), "trainer.pt is truncated", False),
    "rng file missing": (lambda c: (c / "rng_0.pt").unlink(), "rng_0.pt is missing", False),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_a_reason_and_named_in_one_line(
        damage, reference, tiny_beans, tmp_path, capsys):
    do, says, export_reads_it = DAMAGE[damage]
    run = copy_run(reference, tmp_path)
    newest = run / "checkpoints" / STEP(6)
    do(newest)
    # an explicit folder: one line that names it and why
    err = fails_with(capsys, train_args(tiny_beans, run, *KEEP_ALL, "--resume", str(newest)), str(newest), says)
    assert "--resume auto" in err
    # export of that folder: one line too (where export reads the damaged part); of the run: the newest that loads
    if export_reads_it:
        fails_with(capsys, ["export", "--checkpoint", str(newest), "--output", str(tmp_path / "hf")], says)
        assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "hf")]) == 0
        assert f"skipping {newest}: " in capsys.readouterr().out
    # --resume auto: falls back to step 4, says so, and ends exactly where the unbroken run ended
    assert main(train_args(tiny_beans, run, *KEEP_ALL, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert f"skipping {newest}: " in out and says in out, out
    assert f"resumed from {run / 'checkpoints' / STEP(4)} at step 4" in out
    assert_same_weights(reference, run)


def test_resume_auto_when_no_checkpoint_loads_ends_in_one_line(reference, tiny_beans, tmp_path, capsys):
    run = copy_run(reference, tmp_path)
    for c in (run / "checkpoints").iterdir():
        (c / ".metadata").write_bytes(b"")
    fails_with(capsys, train_args(tiny_beans, run, *KEEP_ALL, "--resume", "auto"), "no checkpoint in",
               "can be loaded", "--overwrite")


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


# ---------------------------------------------------------------------------- 3. a full disk

def _disk_full_in_dcp(monkeypatch, from_step: int, how: str) -> None:
    """DCP's file writer hits a full disk from checkpoint ``from_step`` on, after writing part of a shard."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter
    write_data = _FileSystemWriter.write_data

    def full(self, plan, planner):
        if int(Path(self.path).name.rsplit("_", 1)[1]) < from_step:
            return write_data(self, plan, planner)
        (Path(self.path) / "__0_0.distcp").write_bytes(b"\0" * 1000)  # half-written
        if how == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(_FileSystemWriter, "write_data", full)
    disk_usage = shutil.disk_usage
    if how == "zip writer":  # what torch.save says on a real full disk: no errno, and no space left
        monkeypatch.setattr(shutil, "disk_usage", lambda p: disk_usage(p)._replace(free=0))


@pytest.mark.parametrize("writes, how", [("--async_checkpoint", "oserror"), ("--no-async_checkpoint", "zip writer")])
def test_a_full_disk_during_a_checkpoint_names_the_last_good_one_and_leaves_no_half_written_folder(
        writes, how, reference, tiny_beans, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _disk_full_in_dcp(monkeypatch, from_step=4, how=how)
    err = fails_with(capsys, train_args(tiny_beans, run, "--save_every", "2", "--keep_checkpoints", "0", writes),
                     f"cannot write checkpoint {run / 'checkpoints' / STEP(4)}", "No space left on device",
                     f"the last good checkpoint is {run / 'checkpoints' / STEP(3)}", "--resume auto")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP(2), STEP(3)], err  # 3: epoch end
    assert [r["step"] for r in rows(run) if "loss" in r][:4] == [1, 2, 3, 4]  # the metrics stay
    monkeypatch.undo()
    assert main(train_args(tiny_beans, run, *KEEP_ALL, "--resume", "auto")) == 0  # nothing lost
    assert_same_weights(reference, run)


def test_a_full_disk_during_the_final_export_keeps_the_summary_and_says_how_to_export_later(
        tiny_beans, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError
    from transformers import PreTrainedModel
    run = tmp_path / "run"

    def full(self, folder, **kw):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    err = fails_with(capsys, train_args(tiny_beans, run), f"cannot write the exported model to {run / 'model'}",
                     "No space left on device", "vitboost export --checkpoint")
    assert not (run / "model").exists() and not (run / "model.tmp").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["test"]["num_samples"] == 6 and rows(run)
    monkeypatch.undo()
    command = err.split("`")[1].split()  # the command the line suggests works once there is space
    assert main(command[1:]) == 0 and (run / "model" / "model.safetensors").is_file()


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


# ---------------------------------------------------------------------------- 4. save a step once, replace safely

def test_an_epoch_end_that_is_also_a_save_every_step_is_saved_once(tiny_beans, tmp_path, monkeypatch):
    import vitboost.train
    saved: list[int] = []
    save = vitboost.train.save_checkpoint

    def record(root, step, *a, **kw):
        saved.append(step)
        return save(root, step, *a, **kw)

    monkeypatch.setattr(vitboost.train, "save_checkpoint", record)
    assert main(train_args(tiny_beans, tmp_path / "run", "--save_every", "3", "--keep_checkpoints", "1")) == 0
    assert saved == [3, 6]  # steps 3 and 6 end epochs 1 and 2


def _checkpoint(folder: Path, content: str) -> Path:
    folder.mkdir(parents=True)
    for name in (".metadata", "trainer.pt"):
        (folder / name).write_text(content)
    return folder


def test_a_finished_checkpoint_is_never_deleted_before_its_replacement_is_in_place(tmp_path, monkeypatch):
    from vitboost.checkpoint import _publish
    root = tmp_path / "checkpoints"
    final = _checkpoint(root / STEP(5), "old")
    tmp = _checkpoint(root / f".tmp_{STEP(5)}", "new")
    rename = Path.rename

    def crash(self, target):  # the replacement cannot be moved into place
        if self == tmp:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(OSError):
        _publish(tmp, final, keep=1)
    assert (final / ".metadata").read_text() == "old"  # the good one is still there, under its name
    monkeypatch.undo()
    _publish(tmp, final, keep=1)
    assert (final / ".metadata").read_text() == "new" and sorted(os.listdir(root)) == [STEP(5)]


# ---------------------------------------------------------------------------- 5 and 10. leftovers, one row per step

def test_resume_from_an_older_checkpoint_keeps_one_metrics_row_per_step_and_clears_killed_writes(
        reference, tiny_beans, tmp_path, capsys):
    run = copy_run(reference, tmp_path)
    killed = run / "checkpoints" / f".tmp_{STEP(5)}"  # what a kill during a write leaves
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"\0" * (1 << 20))
    assert main(train_args(tiny_beans, run, *KEEP_ALL, "--resume", str(run / "checkpoints" / STEP(4)))) == 0
    assert not killed.exists()
    assert rows(run) == rows(reference)  # steps 5 and 6 and the epoch-2 eval were logged again, once
    assert json.loads((run / "summary.json").read_text())["history"] == \
        json.loads((reference / "summary.json").read_text())["history"]
    assert_same_weights(reference, run)


def test_pruning_removes_leftovers_of_killed_writes(tmp_path):
    from vitboost.checkpoint import _publish
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        _checkpoint(root / STEP(step), "x")
    _checkpoint(root / f".tmp_{STEP(9)}", "killed")
    _publish(_checkpoint(root / f".tmp_{STEP(3)}", "x"), root / STEP(3), keep=2)
    assert sorted(os.listdir(root)) == [STEP(2), STEP(3)]


# ---------------------------------------------------------------------------- 6. every image mode

GRADIENT16 = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)


def _gray(values8: np.ndarray) -> np.ndarray:
    return np.repeat(values8[..., None], 3, axis=-1)


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _pgm(values: np.ndarray, maxval: int) -> bytes:
    return f"P5\n{values.shape[1]} {values.shape[0]}\n{maxval}\n".encode() + values.astype(">u2").tobytes()


def _expected16(v: np.ndarray, top: int = 65535) -> np.ndarray:
    return _gray(np.rint(v.astype(np.float64) * 255 / top).astype(np.uint8))


_rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
_alpha = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
_l = _rgb[..., 0]

MODES = {  # file bytes, the RGB they must decode to, tolerance (rounding of PIL's own conversions)
    "16-bit gray PNG": (_saved(Image.fromarray(GRADIENT16), "PNG"), _expected16(GRADIENT16), 0),
    "16-bit gray TIFF": (_saved(Image.fromarray(GRADIENT16), "TIFF"), _expected16(GRADIENT16), 0),
    "16-bit PGM": (_pgm(GRADIENT16, 65535), _expected16(GRADIENT16), 0),
    "12-bit PGM": (_pgm(GRADIENT16 >> 4, 4095), _expected16(GRADIENT16 >> 4, 4095), 1),
    "32-bit integer TIFF": (_saved(Image.fromarray(GRADIENT16.astype(np.int32)), "TIFF"), _expected16(GRADIENT16), 0),
    "16-bit gray PNG, transparent key": (
        _saved(Image.fromarray(GRADIENT16), "PNG", transparency=int(GRADIENT16[0, 5])),
        np.where((GRADIENT16 == GRADIENT16[0, 5])[..., None], 255, _expected16(GRADIENT16)), 0),
    "16-bit RGB PNG": (None, _rgb, 0),  # written below: PIL cannot write it
    "1-bit PNG": (_saved(Image.fromarray(_l > 127), "PNG"), _gray(np.where(_l > 127, 255, 0).astype(np.uint8)), 0),
    "palette PNG": (_saved(Image.fromarray(_rgb).quantize(16), "PNG"),
                    np.asarray(Image.fromarray(_rgb).quantize(16).convert("RGB")), 0),
    "gray + alpha PNG": (_saved(Image.merge("LA", (Image.fromarray(_l), Image.fromarray(_alpha))), "PNG"),
                         _gray(np.rint(_l * (_alpha / 255) + 255 * (1 - _alpha / 255)).astype(np.uint8)), 1),
    "LAB TIFF": (None, None, 0),  # written below with a colour transform
}


def _lab() -> tuple[bytes, np.ndarray]:
    """A CIELAB TIFF and the sRGB that a colour-managed conversion gives for it."""
    from PIL import ImageCms
    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    image = ImageCms.applyTransform(Image.fromarray(_rgb), ImageCms.buildTransform(srgb, lab, "RGB", "LAB"))
    back = ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    return _saved(image, "TIFF"), np.asarray(back)


def _png_rgb16(rgb8: np.ndarray) -> bytes:
    import struct
    import zlib
    v = rgb8.astype(np.uint16) * 257
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in v)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", v.shape[1], v.shape[0], 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_decodes_to_the_right_rgb(mode, tmp_path):
    from vitboost.data import decode_image
    data, expected, tolerance = MODES[mode]
    if mode == "16-bit RGB PNG":
        data = _png_rgb16(_rgb)
    elif mode == "LAB TIFF":
        data, expected = _lab()
    f = tmp_path / "image"
    f.write_bytes(data)
    got = decode_image(f, 32).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - expected.astype(int)).max() <= tolerance, Image.open(f).mode


@pytest.mark.parametrize("pixels", ["float", "32-bit beyond 16"])
def test_images_without_a_standard_range_fail_in_one_line_naming_the_file(pixels, tmp_path):
    from vitboost.data import DataError, load_image_dataset
    from tests.conftest import make_imagefolder
    data = make_imagefolder(tmp_path / "data", {"train": 1})
    values = GRADIENT16.astype(np.float32) / 65535 if pixels == "float" else GRADIENT16.astype(np.int32) * 100
    Image.fromarray(values).save(data / "train" / "healthy" / "odd.tif")
    with pytest.raises(DataError) as e:
        load_image_dataset(data, 32, None, log=lambda *_: None)
    assert "odd.tif" in str(e.value) and "no standard range" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- 7 and 10. impossible values

@pytest.mark.parametrize("extra, phrase", [
    (["--image_size", "30"], "--image_size 30 is not a multiple of --patch_size 8; use 24 or 32"),
    (["--image_size", "32", "--patch_size", "5"], "not a multiple of --patch_size 5"),
    (["--patch_size", "64"], "--patch_size 64 is larger than the image (32px)"),
    (["--image_size", "0"], "--image_size must be >= 1"),
    (["--image_size", "-32"], "--image_size must be >= 1"),
    (["--patch_size", "0"], "--patch_size must be >= 1"),
    (["--max_steps", "-1"], "--max_steps must be >= 0"),
    (["--save_every", "-2"], "--save_every must be >= 0"),
    (["--save_epochs", "0"], "--save_epochs must be >= 1"),
    (["--keep_checkpoints", "-1"], "--keep_checkpoints must be >= 0"),
    (["--eval_every", "-1"], "--eval_every must be >= 0"),
    (["--layer_decay", "0"], "--layer_decay must be in (0, 1]"),
    (["--layer_decay", "1.5"], "--layer_decay must be in (0, 1]"),
])
def test_impossible_sizes_and_counts_are_refused(capsys, tiny_beans, tmp_path, extra, phrase):
    fails_with(capsys, train_args(tiny_beans, tmp_path / "run", *extra), phrase)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- 8. untrusted files run no code

class _Payload:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(where: str, checkpoint: Path, marker: Path) -> None:
    """Replace part of a real checkpoint with code that would run on a plain pickle.load."""
    if where == ".metadata":
        (checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    elif where == "trainer.pt":
        torch.save({"step": _Payload(marker)}, checkpoint / "trainer.pt")
    else:  # a value of the shards (DCP reads those with torch.load(weights_only=False))
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        from vitboost.checkpoint import read_metadata
        md = read_metadata(checkpoint)
        state = {k: torch.zeros(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata)
                 else _Payload(marker) for k, m in md.state_dict_metadata.items()}
        for f in checkpoint.glob("*.distcp"):
            f.unlink()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # single process, overwriting
            dcp.save(state, checkpoint_id=checkpoint, no_dist=True)


@pytest.mark.parametrize("where", [".metadata", "shard value", "trainer.pt"])
def test_a_crafted_checkpoint_is_refused_without_running_its_code(where, reference, tiny_beans, tmp_path, capsys):
    run, marker = copy_run(reference, tmp_path), tmp_path / "pwned"
    newest = run / "checkpoints" / STEP(6)
    _plant(where, newest, marker)
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    capsys.readouterr()
    fails_with(capsys, train_args(tiny_beans, run, *KEEP_ALL, "--resume", str(newest)), str(newest), "refused",
               "never runs code")
    if where == ".metadata":  # export reads only that and the model's tensors
        fails_with(capsys, ["export", "--checkpoint", str(newest), "--output", str(tmp_path / "hf")], "refused")
    assert main(train_args(tiny_beans, run, *KEEP_ALL, "--resume", "auto")) == 0
    assert f"skipping {newest}: " in capsys.readouterr().out
    assert not marker.exists()


class _EarlyPy311Pickler(pickle.Pickler):
    """Pickles enum members as early Python 3.11 releases do (3.11.2, Debian 12's): getattr(Enum, "NAME")."""

    def __init__(self, f, getattr_of=None):
        super().__init__(f)
        self.getattr_of = getattr_of  # (class, attribute): pickle the first enum member as this getattr instead

    def reducer_override(self, obj):
        import enum
        if isinstance(obj, enum.Enum):
            return getattr, self.getattr_of or (type(obj), obj.name)
        return NotImplemented


def _metadata_as_older_pythons_write_it(folder: Path, getattr_of=None) -> Path:
    import io
    import torch.distributed.checkpoint.metadata as md
    folder.mkdir()
    meta = md.Metadata(state_dict_metadata={"w": md.TensorStorageMetadata(
        properties=md.TensorProperties(dtype=torch.bfloat16), size=torch.Size([4]),
        chunks=[md.ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([4]))])}, storage_data={})
    buf = io.BytesIO()
    _EarlyPy311Pickler(buf, getattr_of).dump(meta)
    (folder / ".metadata").write_bytes(buf.getvalue())
    return folder


def test_checkpoint_metadata_written_by_python_3_11_2_loads_and_only_its_enum_getattr_is_admitted(tmp_path):
    import pathlib
    import torch.distributed.checkpoint.metadata as md
    from vitboost.checkpoint import DamagedCheckpoint, read_metadata
    got = read_metadata(_metadata_as_older_pythons_write_it(tmp_path / "py3112"))
    props = got.state_dict_metadata["w"].properties
    assert props.dtype == torch.bfloat16 and props.memory_format == torch.contiguous_format
    for i, (cls, name) in enumerate([(md._MEM_FORMAT_ENCODING, "__class__"),  # an enum's, but not a member
                                     (pathlib.Path, "home")]):  # an admitted class's method, not an enum member
        with pytest.raises(DamagedCheckpoint, match=f"refused: it calls builtins.getattr.*{name}"):
            read_metadata(_metadata_as_older_pythons_write_it(tmp_path / f"crafted{i}", (cls, name)))


@pytest.mark.parametrize("pretrained", ["none", "auto"])
def test_a_model_folder_with_custom_code_is_refused_without_prompting(pretrained, capsys, tiny_beans, tmp_path):
    folder, marker = tmp_path / "model", tmp_path / "pwned"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_vit", "image_size": 32,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (folder / "configuration_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    fails_with(capsys, train_args(tiny_beans, tmp_path / "run", "--model", str(folder), "--pretrained", pretrained),
               str(folder), "custom code", "never runs")
    assert not marker.exists()


# ---------------------------------------------------------------------------- 9. preemption

def test_a_signal_mid_run_checkpoints_that_step_and_resume_matches_an_unbroken_run(
        reference, tiny_beans, tmp_path, capsys, monkeypatch):
    import vitboost.train
    run = tmp_path / "run"
    calls, publish = [], vitboost.train.publish_finished

    def signal_at_step_2() -> None:  # the scheduler's signal lands while step 2 runs
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        publish()

    monkeypatch.setattr(vitboost.train, "publish_finished", signal_at_step_2)
    assert main(train_args(tiny_beans, run, *KEEP_ALL)) == 128 + signal.SIGUSR1
    err = capsys.readouterr().err.strip()
    assert err == (f"stopped by SIGUSR1 after step 2; checkpoint {run / 'checkpoints' / STEP(2)} written: "
                   f"continue with the same command and --resume auto")
    assert not (run / "summary.json").exists() and (run / "checkpoints" / STEP(2) / ".metadata").is_file()
    monkeypatch.undo()
    assert main(train_args(tiny_beans, run, *KEEP_ALL, "--resume", "auto")) == 0
    assert_same_weights(reference, run)
    assert rows(run) == rows(reference)


def _sigterm_when_training(p: subprocess.Popen, metrics: Path, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert time.time() < end and p.poll() is None, "training never started"
        time.sleep(0.001)
    p.send_signal(signal.SIGTERM)


def test_sigterm_to_one_process_checkpoints_and_resume_auto_matches_an_unbroken_run(tiny_beans, tmp_path):
    flags = ("--epochs", "100", "--eval_every", "0", "--save_epochs", "100")  # ~2 s of training on CPU
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    command = [sys.executable, "-m", "vitboost"]
    subprocess.run([*command, *train_args(tiny_beans, unbroken, *flags)], env=ENV, cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    p = subprocess.Popen([*command, *train_args(tiny_beans, broken, *flags)], env=ENV, cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _sigterm_when_training(p, broken / "metrics.jsonl")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, out + err
    saved = [c.name for c in (broken / "checkpoints").iterdir()]
    assert len(saved) == 1 and f"checkpoint {broken / 'checkpoints' / saved[0]} written" in err, err
    assert 0 < int(saved[0][5:]) < 300, "stopped mid-run"
    again = subprocess.run([*command, *train_args(tiny_beans, broken, *flags, "--resume", "auto")], env=ENV,
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"resumed from {broken / 'checkpoints' / saved[0]}" in again.stdout, again.stderr
    assert_same_weights(unbroken, broken)
    assert rows(unbroken) == rows(broken)


def test_a_signal_handled_while_the_ranks_agree_is_not_lost(monkeypatch):
    """Ranks wait in should_stop's all_reduce, so that is where a signal often lands: the reduction
    already under way agrees on "go on", and the next one must still see the signal."""
    import vitboost.preempt as preempt
    p = preempt.Preemption(every=1)
    try:
        p._multi = True  # as under torchrun; the reduction below stands in for the other ranks

        def all_reduce_interrupted(flag, op=None):  # this rank's flag was 0 when the reduction began
            p._handle(signal.SIGTERM, None)

        monkeypatch.setattr(preempt.dist, "all_reduce", all_reduce_interrupted)
        assert not p.should_stop(1)
        monkeypatch.setattr(preempt.dist, "all_reduce", lambda flag, op=None: None)
        assert p.should_stop(2) and p.signum == signal.SIGTERM
    finally:
        preempt.restore_signals()


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resume_matches(tiny_beans, vit4_dir, tmp_path):
    # ranks agree every --log_every (2) steps: the checkpoint's step is even
    extra = ["--plugin", "torch_ddp", "--epochs", "30", "--eval_every", "0", "--save_epochs", "100",
             "--log_every", "2"]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"

    def launch(out: Path, *more: str, launcher=torchrun) -> list[str]:
        return launcher("--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                        f"localhost:{free_port()}", *train_flags(tiny_beans, vit4_dir, out, *extra, *more))

    ref = subprocess.run(launch(unbroken), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    p = subprocess.Popen(launch(broken, launcher=vitboost_launch),  # torchrun run from vitboost: the same
                         env=ENV, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _sigterm_when_training(p, broken / "metrics.jsonl")
    log = p.communicate(timeout=300)[0]
    saved = [c.name for c in (broken / "checkpoints").iterdir()]
    assert len(saved) == 1 and "stopped by SIGTERM" in log and "--resume auto" in log, log
    assert p.returncode == 128 + signal.SIGTERM and "launch: stopped by SIGTERM" in log, log
    step = int(saved[0][5:])
    assert 0 < step < 89 and step % 2 == 0, saved
    # a newer checkpoint that only rank 1 cannot load: both ranks must skip it, or the load would hang
    newer = broken / "checkpoints" / STEP(89)
    shutil.copytree(broken / "checkpoints" / saved[0], newer)
    (newer / "rng_1.pt").unlink()
    again = subprocess.run(launch(broken, "--resume", "auto"), env=ENV, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and f"resumed from {broken / 'checkpoints' / saved[0]}" in again.stdout, \
        again.stdout + again.stderr
    assert f"skipping {newer}: rng_1.pt is missing (on rank 1)" in again.stdout
    a, b = json.loads((unbroken / "summary.json").read_text()), json.loads((broken / "summary.json").read_text())
    for split in ("validation", "test"):
        assert b["eval"][split]["confusion_matrix"] == a["eval"][split]["confusion_matrix"]
        assert abs(b["eval"][split]["loss"] - a["eval"][split]["loss"]) < 1e-5
    assert_params_close(load_file(unbroken / "model" / "model.safetensors"),
                        load_file(broken / "model" / "model.safetensors"))
    assert [r["step"] for r in rows(broken)] == [r["step"] for r in rows(unbroken)]  # one row per logged step
