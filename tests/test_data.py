"""Tests for vitboost.data: loading, caching, conversion, errors, batching, parquet and hub paths."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here; never wait on retries

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from vitboost.data import (DataError, ImageDataset, iterate_batches, load_image_dataset, normalize,
                           num_batches)

REPO = Path(__file__).resolve().parents[1]
BEANS = REPO / "data" / "beans"
CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]
needs_beans = pytest.mark.skipif(not (BEANS / "train").is_dir(), reason="data/beans not present")
SIZE = 16


def beans_file(cls: str = "healthy", i: int = 0) -> Path:
    return sorted((BEANS / "train" / cls).glob("*.jpg"))[i]


def make_folder(root: Path, counts: dict[str, int] | None = None, classes: list[str] = CLASSES,
                split_dirs: bool = True) -> Path:
    """A tiny imagefolder of real bean JPEGs: root/split/class/*.jpg (or root/class/*.jpg)."""
    counts = counts or {"train": 3, "validation": 2, "test": 1}
    for split, n in counts.items():
        for c, cls in enumerate(classes):
            d = root / split / cls if split_dirs else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shutil.copy2(beans_file(CLASSES[c % 3], i), d / f"{cls}_{i}.jpg")
    return root


def load(source, **kw) -> tuple[ImageDataset, list[str]]:
    logs: list[str] = []
    kw.setdefault("image_size", SIZE)
    return load_image_dataset(str(source), log=logs.append, **kw), logs


@pytest.fixture
def count_opens(monkeypatch):
    """Counts PIL.Image.open calls (the decoder threads call it through the module)."""
    calls: list[object] = []
    real_open = PIL.Image.open

    def counting_open(fp, *a, **kw):
        calls.append(fp)
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    return calls


def data_error(source, **kw) -> str:
    with pytest.raises(DataError) as ei:
        load(source, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------------------- imagefolder

@needs_beans
def test_imagefolder_splits_labels_and_dtypes(tmp_path):
    ds, _ = load(make_folder(tmp_path / "d"))
    assert ds.label_names == CLASSES
    assert ds.id2label == {0: CLASSES[0], 1: CLASSES[1], 2: CLASSES[2]}
    assert ds.label2id == {c: i for i, c in enumerate(CLASSES)}
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 9, "validation": 6, "test": 3}
    train = ds.splits["train"]
    assert train.images.shape == (9, 3, SIZE, SIZE) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.skipped == []


@needs_beans
def test_class_folders_directly_are_train_only_and_val_alias(tmp_path):
    ds, _ = load(make_folder(tmp_path / "flat", {"train": 2}, split_dirs=False))
    assert list(ds.splits) == ["train"] and len(ds.splits["train"]) == 6
    root = make_folder(tmp_path / "alias", {"train": 1, "val": 1})
    (root / "README.md").write_text("not an image")
    (root / "train" / "healthy" / "notes.txt").write_text("x")
    ds, logs = load(root)
    assert list(ds.splits) == ["train", "validation"]
    assert any("ignored 1 non-image" in line for line in logs)


@needs_beans
def test_matches_transformers_vit_processor(tmp_path):
    """uint8 resize + normalize() == ViTImageProcessorPil output (PIL bilinear, RGBA on white)."""
    vit = pytest.importorskip("transformers.models.vit.image_processing_pil_vit")
    root = make_folder(tmp_path / "d", {"train": 2}, classes=["a"], split_dirs=False)
    rgba = Image.open(beans_file()).convert("RGBA").resize((40, 30))
    rgba.putalpha(Image.linear_gradient("L").resize((40, 30)))
    rgba.save(root / "a" / "z_rgba.png")
    files = sorted((root / "a").iterdir())
    for resample in ("bilinear", "bicubic"):
        ds, _ = load(root, image_size=32, resample=resample)
        proc = vit.ViTImageProcessorPil(size={"height": 32, "width": 32},
                                        resample=Image.Resampling[resample.upper()], do_convert_rgb=True)
        ref = proc([Image.open(f) for f in files], return_tensors="pt")["pixel_values"]
        ours = normalize(ds.splits["train"].images, proc.image_mean, proc.image_std)
        if not composites_on_white():  # older transformers (5.17) drop alpha: compare the RGB files only
            ours, ref = ours[:-1], ref[:-1]
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def composites_on_white() -> bool:
    """Whether the installed transformers' convert_to_rgb composites transparency on white (5.24; we do)."""
    from transformers.image_transforms import convert_to_rgb
    clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    return np.asarray(convert_to_rgb(clear)).reshape(-1).tolist() == [255, 255, 255]


def test_grayscale_cmyk_rgba_palette_converted_to_rgb(tmp_path):
    d = tmp_path / "modes" / "c"
    d.mkdir(parents=True)
    Image.new("L", (8, 8), 100).save(d / "gray.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=100)
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(d / "rgba.png")  # fully transparent -> white
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.save(d / "pal.gif")
    Image.new("I;16", (8, 8), 300).save(d / "gray16.png")
    ds, _ = load(tmp_path / "modes", image_size=4)
    px = {name: ds.splits["train"].images[i, :, 0, 0].tolist()
          for i, name in enumerate(sorted(p.name for p in d.iterdir()))}
    assert px["gray.png"] == [100, 100, 100]
    assert px["rgba.png"] == [255, 255, 255]
    assert px["pal.gif"] == [0, 200, 0]
    r, g, b = px["cmyk.jpg"]
    assert r > 200 and g < 40 and b < 40  # CMYK (0,255,255,0) is red
    assert px["gray16.png"] == [1, 1, 1]  # 300 of 65535 is 1 of 255: scaled, not clipped (Pillow alone: 255)


# ---------------------------------------------------------------------------- cache

@needs_beans
def test_cache_reuse_decodes_nothing(tmp_path, count_opens):
    root, cache = make_folder(tmp_path / "d"), tmp_path / "cache"
    first, logs1 = load(root, cache_dir=cache)
    assert len(count_opens) == 18 and "built cache" in logs1[-1]
    count_opens.clear()
    second, logs2 = load(root, cache_dir=cache)
    assert count_opens == [] and "reused cache" in logs2[-1]
    assert second.fingerprint == first.fingerprint and second.label_names == first.label_names
    for k in first.splits:
        assert torch.equal(first.splits[k].images, second.splits[k].images)
        assert torch.equal(first.splits[k].labels, second.splits[k].labels)
    assert [p.name for p in cache.iterdir()] == [f"{first.fingerprint}.pt"]  # no temp files left


@needs_beans
def test_fingerprint_tracks_files_size_and_resample(tmp_path):
    root = make_folder(tmp_path / "d", {"train": 1})
    base = load(root)[0].fingerprint
    assert load(root)[0].fingerprint == base
    assert load(root, image_size=SIZE + 1)[0].fingerprint != base
    assert load(root, resample="bicubic")[0].fingerprint != base
    f = root / "train" / "healthy" / "healthy_0.jpg"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = load(root)[0].fingerprint
    assert touched != base
    shutil.copy(beans_file("healthy", 5), f)
    assert load(root)[0].fingerprint not in (base, touched)


@needs_beans
def test_unreadable_cache_is_rebuilt(tmp_path):
    root, cache = make_folder(tmp_path / "d", {"train": 1}), tmp_path / "cache"
    ds, _ = load(root, cache_dir=cache)
    (cache / f"{ds.fingerprint}.pt").write_bytes(b"garbage")
    again, logs = load(root, cache_dir=cache)
    assert any("unusable" in line for line in logs) and "built cache" in logs[-1]
    assert torch.equal(again.splits["train"].images, ds.splits["train"].images)


# ---------------------------------------------------------------------------- errors

def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not an image")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@needs_beans
@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("empty", "no images found"),
    ("empty_class", "class folder"),
    ("unknown_class", "class 'mystery' in the validation split"),
    ("corrupt", "cannot decode image train/healthy/healthy_1.jpg"),
    ("truncated", "cannot decode image train/bean_rust/bean_rust_0.jpg"),
    ("no_train", "no train split"),
])
def test_bad_input_one_line_error_and_no_cache(tmp_path, case, expected):
    root, cache = tmp_path / "d", tmp_path / "cache"
    if case == "empty":
        root.mkdir()
    elif case != "missing":
        make_folder(root, {"train": 2, "validation": 1})
    if case == "empty_class":
        (root / "train" / "lonely").mkdir()
    elif case == "unknown_class":
        shutil.copytree(root / "validation" / "healthy", root / "validation" / "mystery")
    elif case == "corrupt":
        _corrupt(root / "train" / "healthy" / "healthy_1.jpg")
    elif case == "truncated":
        _truncate(root / "train" / "bean_rust" / "bean_rust_0.jpg")
    elif case == "no_train":
        shutil.rmtree(root / "train")
    msg = data_error(root, cache_dir=cache)
    assert expected in msg
    if case == "empty_class":
        assert "lonely" in msg
    if case in ("corrupt", "truncated"):
        assert "--skip_bad_images" in msg
    assert not cache.exists() or list(cache.iterdir()) == []


@needs_beans
def test_skip_bad_images(tmp_path, count_opens):
    root, cache = make_folder(tmp_path / "d", {"train": 3, "test": 1}), tmp_path / "cache"
    _corrupt(root / "train" / "healthy" / "healthy_1.jpg")
    _truncate(root / "test" / "bean_rust" / "bean_rust_0.jpg")
    ds, logs = load(root, cache_dir=cache, skip_bad_images=True)
    assert sorted(ds.skipped) == ["test/bean_rust/bean_rust_0.jpg", "train/healthy/healthy_1.jpg"]
    assert len(ds.splits["train"]) == 8 and len(ds.splits["test"]) == 2
    assert ds.splits["train"].labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert ds.splits["test"].labels.tolist() == [0, 2]
    assert any("skipped 2 unreadable" in line for line in logs)
    count_opens.clear()
    assert "healthy_1.jpg" in data_error(root, cache_dir=cache)  # cached, still refused without the flag
    again, _ = load(root, cache_dir=cache, skip_bad_images=True)
    assert count_opens == [] and again.skipped == ds.skipped


def test_path_like_missing_source_is_not_sent_to_the_hub(tmp_path):
    assert "dataset folder" in data_error(tmp_path / "nope")
    assert "does not exist" in data_error("./nope-not-here")


# ---------------------------------------------------------------------------- batching

def test_eval_batches_cover_every_index_once():
    batches = list(iterate_batches(10, 3, shuffle=False))
    assert [len(b) for b in batches] == [3, 3, 3, 1] and num_batches(10, 3, False) == 4
    assert torch.cat(batches).tolist() == list(range(10))
    assert [len(b) for b in iterate_batches(10, 3, shuffle=True, drop_last=True)] == [3, 3, 3]
    assert num_batches(10, 3, True) == 3 and num_batches(9, 3, False) == 3


def test_shuffle_is_deterministic_in_seed_and_epoch():
    def order(**kw):
        return torch.cat(list(iterate_batches(50, 8, shuffle=True, **kw))).tolist()

    assert sorted(order(seed=1, epoch=2)) == list(range(50))
    assert order(seed=1, epoch=2) == order(seed=1, epoch=2)
    assert order(seed=1, epoch=2) != order(seed=1, epoch=3)
    assert order(seed=0, epoch=1) != order(seed=1, epoch=0)


def test_start_resumes_mid_epoch():
    full = list(iterate_batches(50, 8, shuffle=True, seed=3, epoch=4))
    resumed = list(iterate_batches(50, 8, shuffle=True, seed=3, epoch=4, start=5))
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(full[5:], resumed))
    assert list(iterate_batches(50, 8, shuffle=False, start=99)) == []


def test_normalize_values_dtype_and_device():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize(x, mean=[0.5, 0.5, 0.0], std=[0.5, 0.25, 0.2])
    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == x.device
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, 2.0, 1.0]))
    assert normalize(x, [0.5] * 3, [0.5] * 3, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        normalize(x.float(), [0.5] * 3, [0.5] * 3)


# ---------------------------------------------------------------------------- parquet and hub

def _write_parquet(path: Path, files: list[Path], labels: list, class_names: list[str] | None) -> None:
    datasets = pytest.importorskip("datasets")
    label_feature = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    rows = {"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files], "label": labels}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


@needs_beans
def test_parquet_round_trip_matches_imagefolder(tmp_path, count_opens):
    root = make_folder(tmp_path / "folder", {"train": 2, "validation": 1})
    pq_dir = tmp_path / "parquet" / "data"
    pq_dir.mkdir(parents=True)
    for split in ("train", "validation"):
        files = sorted((root / split).rglob("*.jpg"))
        labels = [CLASSES.index(f.parent.name) for f in files]
        _write_parquet(pq_dir / f"{split}-00000-of-00001.parquet", files, labels, CLASSES)
    ref, _ = load(root)
    cache = tmp_path / "cache"
    got, _ = load(tmp_path / "parquet", cache_dir=cache)
    assert got.label_names == CLASSES and list(got.splits) == ["train", "validation"]
    for k in ref.splits:
        assert torch.equal(got.splits[k].images, ref.splits[k].images)
        assert torch.equal(got.splits[k].labels, ref.splits[k].labels)
    count_opens.clear()
    assert load(tmp_path / "parquet", cache_dir=cache)[0].fingerprint == got.fingerprint
    assert count_opens == []


@needs_beans
def test_single_parquet_without_class_names(tmp_path):
    files = [beans_file("healthy", i) for i in range(3)]
    path = tmp_path / "mine.parquet"
    _write_parquet(path, files, [7, 3, 7], None)
    ds, _ = load(path)
    assert ds.label_names == ["3", "7"] and ds.splits["train"].labels.tolist() == [1, 0, 1]


@needs_beans
def test_hub_dataset_is_decoded_by_us_and_cached(tmp_path, monkeypatch, count_opens):
    """The hub path with datasets.load_dataset stubbed by an in-memory DatasetDict."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=CLASSES)})

    def split(labels: list[int]):
        rows = [{"bytes": beans_file(CLASSES[max(y, 0)], i).read_bytes(), "path": None}
                for i, y in enumerate(labels)]
        return datasets.Dataset.from_dict({"image": rows, "labels": labels}, features=features)

    dd = datasets.DatasetDict({"test": split([-1, -1]), "train": split([2, 0, 1]), "valid": split([1])})
    monkeypatch.setattr(datasets, "load_dataset", lambda source: dd)
    cache = tmp_path / "cache"
    ds, logs = load("someone/beans", cache_dir=cache)
    assert list(ds.splits) == ["train", "validation"] and ds.label_names == CLASSES
    assert ds.splits["train"].labels.tolist() == [2, 0, 1]
    assert len(count_opens) == 4  # the unlabeled test split is dropped before decoding
    assert any("test split" in line and "no labels" in line for line in logs)
    count_opens.clear()
    again, _ = load("someone/beans", cache_dir=cache)
    assert count_opens == [] and torch.equal(again.splits["train"].images, ds.splits["train"].images)


def _saved_split(datasets, files: list[Path], labels: list[int], names: list[str]):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rows = [{"bytes": f.read_bytes(), "path": None} for f in files]
    return datasets.Dataset.from_dict({"image": rows, "label": labels}, features=features)


@needs_beans
def test_save_to_disk_folders_are_read_with_load_from_disk(tmp_path, count_opens):
    """A DatasetDict folder (dataset_dict.json) gives its splits and ClassLabel names (not folder
    names, not sorted); a single saved Dataset is the train split; the cache is reused."""
    datasets = pytest.importorskip("datasets")
    names = ["healthy", "angular_leaf_spot", "bean_rust"]  # deliberately not sorted
    files = [beans_file(c, i) for c in ("healthy", "bean_rust") for i in range(2)]
    dd = datasets.DatasetDict({"train": _saved_split(datasets, files, [0, 0, 2, 2], names),
                               "val": _saved_split(datasets, files[:1], [0], names)})
    dd.save_to_disk(str(tmp_path / "dict"))
    cache = tmp_path / "cache"
    ds, _ = load(tmp_path / "dict", cache_dir=cache)
    assert ds.label_names == names and list(ds.splits) == ["train", "validation"]
    assert ds.splits["train"].labels.tolist() == [0, 0, 2, 2]
    ref, _ = load(make_folder(tmp_path / "folder", {"train": 2}))  # the same JPEGs, decoded from files
    assert torch.equal(ds.splits["train"].images[:2], ref.splits["train"].images[4:6])  # healthy 0, 1
    count_opens.clear()
    assert load(tmp_path / "dict", cache_dir=cache)[0].fingerprint == ds.fingerprint and count_opens == []

    dd["train"].save_to_disk(str(tmp_path / "single"))
    single, _ = load(tmp_path / "single")
    assert list(single.splits) == ["train"] and single.label_names == names

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset_dict.json").write_text("{not json")
    assert "load_from_disk" in data_error(tmp_path / "broken")


@needs_beans
def test_saved_dataset_dict_trains_end_to_end_with_its_label_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    from vitboost.cli import main
    names = ["healthy", "angular_leaf_spot", "bean_rust"]
    files = {c: [beans_file(c, i) for i in range(4)] for c in names}
    def split(n: int):
        picked = [(f, y) for y, c in enumerate(names) for f in files[c][:n]]
        return _saved_split(datasets, [f for f, _ in picked], [y for _, y in picked], names)
    datasets.DatasetDict({"train": split(4), "validation": split(1)}).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "run"
    assert main(["train", "--model", "vit-micro", "--dataset", str(tmp_path / "saved"), "--output", str(out),
                 "--epochs", "1", "-b", "4", "--cache_dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] == names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["validation"]["num_samples"] == 3


def test_hub_unreachable_message(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'beans' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = data_error("beans")
    assert msg == ("cannot reach the Hugging Face hub to download dataset 'beans'; "
                   "pass a local folder instead, e.g. --dataset data/beans")

    def missing(*a, **kw):
        raise FileNotFoundError("Dataset 'nope/beanz' doesn't exist on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    assert "cannot load dataset 'nope/beanz'" in data_error("nope/beanz")


def test_hub_offline_fails_fast_for_real(tmp_path):
    """The real datasets.load_dataset with HF_HUB_OFFLINE=1 (fresh process: the flag is read at import)."""
    pytest.importorskip("datasets")
    code = textwrap.dedent("""
        import time
        import datasets
        from vitboost.data import DataError, load_image_dataset
        t0 = time.perf_counter()
        try:
            load_image_dataset("beans", 16)
        except DataError as e:
            print(e)
        print(time.perf_counter() - t0)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    message, seconds = out.stdout.strip().splitlines()[-2:]
    assert "cannot reach the Hugging Face hub to download dataset 'beans'" in message, out.stderr
    assert float(seconds) < 10  # no retries: the hub's take ~23 s (the imports, slow on a busy CPU, not counted)


# ---------------------------------------------------------------------------- the real data

@needs_beans
def test_real_beans_split_sizes_and_labels():
    ds, _ = load(BEANS, image_size=32)
    assert ds.label_names == CLASSES
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 1034, "validation": 133, "test": 128}
    assert ds.splits["train"].labels.bincount().tolist() == [345, 348, 341]
    assert ds.splits["test"].images.shape == (128, 3, 32, 32)


# --- streaming: for data that does not fit in memory -------------------------------------

def test_streamed_batches_equal_cached_batches_bitwise(tmp_path):
    from vitboost.data import StreamingSplit
    src = tmp_path / "d"
    make_folder(src, {"train": 4, "validation": 2})
    cached = load_image_dataset(src, 32, None, log=lambda *_: None)
    streamed = load_image_dataset(src, 32, tmp_path / "cache", stream=True, log=lambda *_: None)
    assert not (tmp_path / "cache").exists()  # streaming writes no cache
    assert streamed.label_names == cached.label_names
    for split in ("train", "validation"):
        s, c = streamed.splits[split], cached.splits[split]
        assert isinstance(s, StreamingSplit) and len(s) == len(c)
        idx = torch.tensor([len(c) - 1, 0, 2])
        assert torch.equal(s.batch(idx), c.batch(idx))
        assert torch.equal(s.labels, c.labels)


def test_a_corrupt_image_met_while_streaming_is_named(tmp_path):
    src = tmp_path / "d"
    make_folder(src, {"train": 2})
    bad = src / "train" / "healthy" / "zz_broken.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = load_image_dataset(src, 32, None, stream=True, log=lambda *_: None)
    with pytest.raises(DataError, match="zz_broken.jpg"):
        ds.splits["train"].batch(torch.arange(len(ds.splits["train"])))
