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
])
def test_impossible_sizes_and_counts_are_refused(capsys, tiny_beans, tmp_path, extra, phrase):
    fails_with(capsys, train_args(tiny_beans, tmp_path / "run", *extra), phrase)
    assert not (tmp_path / "run").exists()


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
