"""Image-classification data as uint8 tensors at the model's input size, cached on disk.

Every image is decoded and resized once (in a thread pool), stored as uint8 (1/4 the
size of float32), and rescaled/normalized later on the training device by `normalize`.
The cache key is computed from the file listing (names, sizes, mtimes) before anything
is decoded, so a second run with the same inputs decodes nothing.

Preprocessing follows transformers' PIL ViT image processor: EXIF orientation applied
(as `datasets.Image` does), converted to RGB with transparency composited on white,
resized to image_size x image_size with PIL bilinear (or bicubic). Every mode PIL opens
becomes the right RGB: 16-bit (and 32-bit integer) grayscale is scaled to 8 bits rather
than clipped; float images, whose range no file states, are refused in one line.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .storage import io_failure

FORMAT_VERSION = 2  # 2: high-bit-depth images scaled, not clipped (caches of 1 are rebuilt)
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
                 "valid": "validation", "test": "test", "testing": "test"}
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Raster formats only: Pillow also registers video (.mpg), HDF5 and PostScript stubs that
# would turn stray non-image files into decode errors.
_RASTER_EXTS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".tif",
                ".tiff", ".webp", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2",
                ".j2k", ".qoi", ".psd", ".pcx", ".sgi", ".ras", ".xbm"}
IMAGE_EXTENSIONS = frozenset(e for e, fmt in Image.registered_extensions().items()
                             if e in _RASTER_EXTS and fmt in Image.OPEN)
HUB_HINT = "pass a local folder instead, e.g. --dataset data/beans"


class DataError(Exception):
    """Bad user data. str(e) is ONE line naming the problem and the fix (the CLI prints it and exits 2)."""


@dataclass
class _Item:
    """One image to decode: from a file or from in-memory bytes; `name` is what errors show."""
    name: str
    path: Path | None = None
    data: bytes | None = None


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8 [N, 3, S, S], CPU
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images for these indices (a slice of the cached tensor)."""
        return self.images[_index_on(idx, self.images.device)]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) for these indices, gathered where the split lives."""
        idx = _index_on(idx, self.images.device)
        return self.images[idx], self.labels[idx]


def _index_on(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host indices -> device without waiting for it: a copy from pageable memory synchronizes the
    stream (the host would stall on every step until the GPU drains), one from pinned memory does not."""
    if device.type != "cuda" or idx.device == device:
        return idx.to(device)
    return idx.pin_memory().to(device, non_blocking=True)


class StreamingSplit:
    """A split decoded batch by batch, for data that does not fit in memory.

    Same decode and resize code as the cache build, so a streamed batch is bitwise equal to
    the cached one; decoding runs in a thread pool (PIL releases the GIL).
    """

    def __init__(self, items: list[_Item], labels: list[int], size: int, resample: Image.Resampling,
                 pool: ThreadPoolExecutor):
        self.items, self.labels = items, torch.tensor(labels, dtype=torch.int64)
        self.size, self.resample, self._pool = size, resample, pool

    def __len__(self) -> int:
        return len(self.labels)

    def _decode(self, i: int) -> torch.Tensor:
        try:
            return _decode_one(self.items[i], self.size, self.resample)
        except Exception as e:  # noqa: BLE001 - any failure means a bad file; report which
            raise DataError(f"cannot decode image {self.items[i].name} ({type(e).__name__}) while streaming; "
                            f"fix or remove it (--skip_bad_images needs the cached path, without --stream)") from None

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) for these indices, decoded now (ImageSplit.take's interface)."""
        return self.batch(idx), self.labels[idx]

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(self._pool.map(self._decode, idx.tolist())))


@dataclass
class ImageDataset:
    splits: dict[str, ImageSplit | StreamingSplit]
    label_names: list[str]
    fingerprint: str
    skipped: list[str] = field(default_factory=list)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}


@dataclass
class _Listing:
    """What to decode. `build` is deferred so that a cache hit never reads image bytes."""
    key: Any  # JSON-able description of the inputs, hashed into the fingerprint
    build: Callable[[], tuple[list[str], dict[str, tuple[list[_Item], list[int]]]]]


# ---------------------------------------------------------------------------- public API

def load_image_dataset(source: str | Path, image_size: int, cache_dir: str | Path | None = None, *,
                       skip_bad_images: bool = False, resample: str = "bilinear", stream: bool = False,
                       log: Callable[[str], None] = print) -> ImageDataset:
    """Load `source` (imagefolder dir, parquet dir/file, save_to_disk folder, or hub id) as uint8 tensors.

    stream=True (or a dataset whose uint8 cache would take over half of the RAM) decodes batch
    by batch instead of caching. Raises DataError (one line) for anything wrong with the data.
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    t0 = time.perf_counter()
    listing = _listing(str(source), log)
    fingerprint = _fingerprint(listing.key, image_size, resample)
    cache_path = Path(cache_dir) / f"{fingerprint}.pt" if cache_dir is not None else None

    if not stream and cache_path is not None and cache_path.exists():
        ds = _read_cache(cache_path, fingerprint, log)
        if ds is not None:
            bad = ds.pop("bad")
            if bad and not skip_bad_images:
                raise _bad_images_error(bad)
            dataset = ImageDataset(**ds)
            log(f"data: reused cache {cache_path} for {source} ({_summary(dataset)}) "
                f"in {time.perf_counter() - t0:.1f}s")
            _log_skipped(bad, log)
            return dataset

    label_names, items = listing.build()
    cache_bytes = sum(len(its) for its, _ in items.values()) * 3 * image_size ** 2
    if not stream and cache_bytes > 0.5 * _ram_bytes():
        log(f"data: the uint8 cache would take {cache_bytes / 2**30:.1f} GiB, over half of the RAM: streaming")
        stream = True
    if stream:
        pool = ThreadPoolExecutor(max_workers=min(32, _cpus()))  # one decode pool for every split
        splits = {k: StreamingSplit(its, labels, image_size, RESAMPLE[resample], pool)
                  for k, (its, labels) in items.items()}
        dataset = ImageDataset(splits, label_names, fingerprint)
        log(f"data: streaming {source} ({_summary(dataset)}) at {image_size}px, decoded batch by batch")
        return dataset
    splits, bad = _decode_splits(items, image_size, RESAMPLE[resample])
    if bad and not skip_bad_images:
        raise _bad_images_error(bad)
    for split, s in splits.items():
        if len(s) == 0:
            raise DataError(f"every image of the {split} split failed to decode (e.g. {bad[0][0]}); "
                            "check the files")
    dataset = ImageDataset(splits, label_names, fingerprint, [name for name, _ in bad])
    if cache_path is not None:
        try:
            _write_cache(cache_path, dataset, bad)
        except Exception as e:  # noqa: BLE001 - a storage failure costs the cache, not the run
            reason = io_failure(e, cache_path)
            if reason is None:
                raise
            log(f"data: cannot write the cache {cache_path} ({reason}); going on without it "
                f"(pass a writable --cache_dir to decode only once)")
            cache_path = None
    what = f"built cache {cache_path} from" if cache_path is not None else "decoded (no cache)"
    log(f"data: {what} {source} ({_summary(dataset)}) at {image_size}px in {time.perf_counter() - t0:.1f}s")
    _log_skipped(bad, log)
    return dataset


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Number of batches per epoch over n examples."""
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                    drop_last: bool = False, start: int = 0) -> Iterator[torch.Tensor]:
    """Yield int64 index tensors, skipping the first `start` batches (resume mid-epoch).

    The order depends only on (seed, epoch), so a resumed run sees the same batches; the
    generator seed packs both (not seed + epoch, which would make seed 1 epoch 0 replay
    seed 0 epoch 1).
    """
    if batch_size <= 0 or start < 0:
        raise ValueError(f"need batch_size > 0 and start >= 0, got {batch_size}, {start}")
    if shuffle:
        g = torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 32) | (epoch & 0xFFFFFFFF))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    for b in range(start, num_batches(n, batch_size, drop_last)):
        yield order[b * batch_size:(b + 1) * batch_size]


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> (x/255 - mean)/std in `dtype`, on the images' device.

    Computed in float32 and cast at the end, so bf16/fp16 lose nothing extra.
    """
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    kw = dict(dtype=torch.float32, device=images_uint8.device)
    mean_t = torch.tensor(mean, **kw).view(-1, 1, 1)
    std_t = torch.tensor(std, **kw).view(-1, 1, 1)
    x = images_uint8.to(torch.float32).mul_(1 / 255).sub_(mean_t).div_(std_t)
    return x.to(dtype)


# ---------------------------------------------------------------------------- sources

def _listing(source: str, log: Callable[[str], None]) -> _Listing:
    """Dispatch on what `source` is: save_to_disk folder, imagefolder dir, parquet dir/file, or hub id."""
    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        return _saved_listing(path, log)
    if path.is_dir():
        parquets = _parquet_files(path)
        return _parquet_listing(path, parquets, log) if parquets else _imagefolder_listing(path, log)
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return _parquet_listing(path, [path], log)
        raise DataError(f"{source} is a file, not a dataset folder or .parquet file; "
                        "pass a folder laid out as split/class/image, e.g. --dataset data/beans")
    if _looks_like_path(source):
        raise DataError(f"dataset folder {source} does not exist; pass an existing folder "
                        "(e.g. --dataset data/beans) or a Hugging Face dataset id")
    return _hub_listing(source, log)


def _looks_like_path(source: str) -> bool:
    """'./x', '/x', '~/x', 'x.parquet', or 'a/b' whose 'a' exists locally: a path, not a hub id."""
    if source.startswith((".", "/", "~")) or source.lower().endswith(".parquet") or "\\" in source:
        return True
    parts = source.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _stat_key(path: Path, root: Path) -> list:
    st = path.stat()
    return [path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _visible(p))


def _split_name(name: str) -> str | None:
    return SPLIT_ALIASES.get(name.lower())


def _imagefolder_listing(root: Path, log: Callable[[str], None]) -> _Listing:
    """Walk root/split/class/*.img (or root/class/*.img = train only) and validate it."""
    split_dirs: dict[str, Path] = {}
    for d in _subdirs(root):
        split = _split_name(d.name)
        if split is None:
            continue
        if split in split_dirs:
            raise DataError(f"{root} has two {split} folders ({split_dirs[split].name} and {d.name}); "
                            "keep one")
        split_dirs[split] = d
    if not split_dirs:
        split_dirs = {"train": root}
    elif "train" not in split_dirs:
        raise DataError(f"{root} has no train split (found {', '.join(split_dirs)}); "
                        f"add {root}/train/<class>/<image> files")

    layout = "split/class/image" if split_dirs.get("train") != root else "class/image"
    files: dict[str, dict[str, list[Path]]] = {}
    ignored: list[Path] = []
    for split in SPLITS:
        if split not in split_dirs:
            continue
        class_dirs = _subdirs(split_dirs[split])
        if not class_dirs:
            raise DataError(f"no images found in {split_dirs[split]}: it has no class folders; "
                            f"lay the dataset out as {root}/train/<class>/<image> (or {root}/<class>/<image>)")
        files[split] = {}
        for cdir in class_dirs:
            found = sorted(p for p in cdir.rglob("*") if p.is_file() and _visible(p))
            images = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
            ignored += [p for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS]
            if not images:
                raise DataError(f"class folder {cdir} has no images ({layout} layout, image files such as "
                                ".jpg/.png); add images to it or remove it")
            files[split][cdir.name] = images

    label_names = sorted(files["train"])
    for split in ("validation", "test"):
        for cls in files.get(split, {}):
            if cls not in label_names:
                raise DataError(f"class '{cls}' in the {split} split ({split_dirs[split] / cls}) does not "
                                f"exist in train (classes: {', '.join(label_names)}); rename or remove it")
    if ignored:
        log(f"data: ignored {len(ignored)} non-image file(s) in {root}, e.g. {ignored[0].relative_to(root)}")

    key = {"kind": "imagefolder",
           "files": [_stat_key(p, root) for split in files for cls in files[split] for p in files[split][cls]]}

    def build() -> tuple[list[str], dict[str, tuple[list[_Item], list[int]]]]:
        out = {}
        label2id = {name: i for i, name in enumerate(label_names)}
        for split, classes in files.items():
            items = [_Item(p.relative_to(root).as_posix(), path=p) for cls in classes for p in classes[cls]]
            labels = [label2id[cls] for cls in classes for _ in classes[cls]]
            out[split] = (items, labels)
        return label_names, out

    return _Listing(key, build)


def _parquet_files(root: Path) -> list[Path]:
    """Parquet files up to three levels down (HF layouts: x.parquet, data/x.parquet, config/split/x.parquet)."""
    return sorted(p for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet")
                  for p in root.glob(pattern) if _visible(p))


def _parquet_split(path: Path, root: Path) -> str | None:
    """Split from the file name prefix (train-00000-of-00001.parquet) or a parent folder name."""
    names = [path.name.split("-")[0].split(".")[0]] + [p.name for p in path.relative_to(root).parents]
    return next((s for s in map(_split_name, names) if s), None)


def _parquet_listing(source: Path, parquets: list[Path], log: Callable[[str], None]) -> _Listing:
    """HF-style parquet: an Image column ({'bytes','path'} structs) and a `label`/`labels` column."""
    root = source if source.is_dir() else source.parent
    by_split: dict[str, list[Path]] = {}
    for p in parquets:
        split = _parquet_split(p, root) or ("train" if source.is_file() else None)
        if split is None:
            raise DataError(f"cannot tell the split of {p}; name it train-*.parquet, validation-*.parquet "
                            "or test-*.parquet")
        by_split.setdefault(split, []).append(p)
    if "train" not in by_split:
        raise DataError(f"{source} has no train split (found {', '.join(by_split)}); "
                        "add a train-*.parquet file")
    key = {"kind": "parquet", "files": [_stat_key(p, root) for p in parquets]}

    def build() -> tuple[list[str], dict[str, tuple[list[_Item], list[int]]]]:
        import datasets
        import pyarrow.parquet as pq

        columns: dict[str, tuple[list[_Item], list]] = {}
        label_feature = None
        for split, paths in by_split.items():
            images, labels = [], []
            for p in paths:
                table = pq.read_table(p)
                features = datasets.Features.from_arrow_schema(table.schema)  # HF metadata, if any
                image_col, label_col = _columns(features, table.column_names, str(p))
                if split == "train" and label_feature is None:
                    label_feature = features[label_col]
                rel = p.relative_to(root).as_posix()
                images += [_item_from_value(v, f"{rel} row {i}", p.parent)
                           for i, v in enumerate(table.column(image_col).to_pylist())]
                labels += table.column(label_col).to_pylist()
            columns[split] = (images, labels)
        return _with_label_ids(columns, label_feature, str(source), log)

    return _Listing(key, build)


def _hub_listing(source: str, log: Callable[[str], None]) -> _Listing:
    """`datasets.load_dataset(source)`; the fingerprint comes from each split's HF fingerprint."""
    import datasets
    try:
        dd = datasets.load_dataset(source)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one actionable line
        raise _hub_error(source, e) from e
    splits = _known_splits(dd, f"dataset '{source}'", log)
    key = {"kind": "hub", "source": source, "splits": {k: ds._fingerprint for k, ds in sorted(splits.items())}}
    return _Listing(key, _datasets_build(splits, f"dataset '{source}'", log))


def _is_saved_dataset(root: Path) -> bool:
    """A `datasets` save_to_disk folder: a DatasetDict (dataset_dict.json) or one Dataset."""
    return (root / "dataset_dict.json").is_file() or (
        (root / "state.json").is_file() and (root / "dataset_info.json").is_file())


def _saved_listing(root: Path, log: Callable[[str], None]) -> _Listing:
    """`datasets.load_from_disk(root)`, then the hub path. A single saved Dataset is the train split.
    The fingerprint comes from the folder's files (names, sizes, mtimes), like an imagefolder's."""
    import datasets
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as e:  # noqa: BLE001 - a broken folder becomes one actionable line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"cannot read {root} with datasets.load_from_disk ({type(e).__name__}: {first}); "
                        "re-create it with save_to_disk") from None
    dd = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    where = f"saved dataset {root}"
    splits = _known_splits(dd, where, log)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    key = {"kind": "saved", "files": [_stat_key(p, root) for p in files]}
    return _Listing(key, _datasets_build(splits, where, log))


def _known_splits(dd: Any, where: str, log: Callable[[str], None]) -> dict[str, Any]:
    """The train/validation/test splits of a DatasetDict under their canonical names."""
    splits = {}
    for name, ds in dd.items():
        split = _split_name(name)
        if split is None or split in splits:
            log(f"data: ignoring split '{name}' of {where}")
            continue
        splits[split] = ds
    if "train" not in splits:
        raise DataError(f"{where} has no train split (found {', '.join(dd)}); "
                        "pass a dataset with a train split")
    return splits


def _datasets_build(splits: dict[str, Any], where: str, log: Callable[[str], None]):
    """The deferred decode list of `datasets` splits: image bytes/paths without decoding, label ids."""
    import datasets

    def build() -> tuple[list[str], dict[str, tuple[list[_Item], list[int]]]]:
        columns = {}
        for split, ds in splits.items():
            image_col, label_col = _columns(ds.features, ds.column_names, where)
            ds = ds.cast_column(image_col, datasets.Image(decode=False))  # we decode, in threads
            images = [_item_from_value(v, f"{split} row {i}", None) for i, v in enumerate(ds[image_col])]
            columns[split] = (images, list(ds[label_col]))
        train = splits["train"]
        label_feature = train.features[_columns(train.features, train.column_names, where)[1]]
        return _with_label_ids(columns, label_feature, where, log)

    return build


def _hub_error(source: str, e: Exception) -> DataError:
    """Network trouble -> 'cannot reach the hub'; anything else (bad name, ...) -> its first line."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    network = (ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError)
    local = f" (no local folder '{source}' exists either)" if "/" in source else ""
    if isinstance(e, network) or type(e).__module__.split(".")[0] in ("requests", "httpx", "urllib3"):
        return DataError(f"cannot reach the Hugging Face hub to download dataset '{source}'{local}; {HUB_HINT}")
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return DataError(f"cannot load dataset '{source}' from the Hugging Face hub{local} "
                     f"({type(e).__name__}: {first}); check the name, or {HUB_HINT}")


def _columns(features: Any, names: list[str], where: str) -> tuple[str, str]:
    """The image column (an Image feature, else 'image'/'img') and the label column."""
    import datasets
    image_cols = [c for c in names if isinstance(features.get(c), datasets.Image)]
    image_cols = image_cols or [c for c in ("image", "img") if c in names]
    label_cols = [c for c in ("label", "labels") if c in names]
    label_cols = label_cols or [c for c in names if isinstance(features.get(c), datasets.ClassLabel)]
    if not image_cols or not label_cols:
        raise DataError(f"{where} needs an image column and a 'label' column (found columns: "
                        f"{', '.join(names)}); rename them")
    return image_cols[0], label_cols[0]


def _item_from_value(value: Any, name: str, base: Path | None) -> _Item:
    """An HF image value: {'bytes','path'} dict, raw bytes, or a path string."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    else:
        data, path = None, value
    if data is not None:
        return _Item(name, data=data)
    if not path:
        return _Item(name)  # decoding reports it
    full = Path(path) if base is None or os.path.isabs(path) else base / path
    return _Item(f"{name} ({path})", path=full)


def _with_label_ids(columns: dict[str, tuple[list[_Item], list]], label_feature: Any, where: str,
                    log: Callable[[str], None]) -> tuple[list[str], dict[str, tuple[list[_Item], list[int]]]]:
    """Map raw label values to 0..K-1: ClassLabel ids as they are, else sorted unique train values."""
    import datasets
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
        to_id = {i: i for i in range(len(names))}
    else:
        uniques = sorted({v for v in columns["train"][1] if v is not None})
        names = [str(v) for v in uniques]
        to_id = {v: i for i, v in enumerate(uniques)}
    out = {}
    for split in [s for s in SPLITS if s in columns]:
        items, raw = columns[split]
        if split != "train" and raw and all(v in (-1, None) for v in raw):
            log(f"data: the {split} split of {where} has no labels; ignoring it")
            continue
        unknown = [v for v in raw if v not in to_id]
        if unknown:
            raise DataError(f"label {unknown[0]!r} in the {split} split of {where} is not a known class "
                            f"(classes: {', '.join(names)}); fix the labels")
        out[split] = (items, [to_id[v] for v in raw])
    if not out["train"][0]:
        raise DataError(f"no images found in the train split of {where}; add some")
    return names, out


# ---------------------------------------------------------------------------- decoding

def _fingerprint(key: Any, image_size: int, resample: str) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "source": key, "image_size": image_size,
                       "resample": resample}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white like transformers' convert_to_rgb."""
    if img.mode == "F":
        raise ValueError("32-bit float pixels have no standard range; save the image as 8- or 16-bit")
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I: PIL's own convert would clip at 255
        img = _gray16_to_8bit(img)
    if img.mode == "La":  # premultiplied alpha: PIL converts it only to LA
        img = img.convert("LA")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _gray16_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (PNG, TIFF, PGM of any maxval, which PIL scales to 16 bits) -> L, rounded, with
    its transparent value (PNG tRNS) kept as an alpha channel. 32-bit integer pixels hold 16-bit data
    in practice; values outside 0..65535 are refused rather than guessed."""
    a = np.asarray(img)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError(f"{img.mode} pixels outside 0..65535 have no standard range; save the image as 8- or 16-bit")
    gray = Image.fromarray(((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    key = img.info.get("transparency")
    if isinstance(key, int):
        alpha = Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray


def _decode_one(item: _Item, size: int, resample: Image.Resampling) -> torch.Tensor:
    """Decode one image to uint8 [3, size, size]."""
    if item.data is None and item.path is None:
        raise ValueError("the row has neither image bytes nor a path")
    with Image.open(io.BytesIO(item.data) if item.data is not None else item.path) as img:
        img.load()
        if img.getexif().get(Image.ExifTags.Base.Orientation) is not None:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img).resize((size, size), resample)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never stream by default


def _decode_splits(items: dict[str, tuple[list[_Item], list[int]]], size: int, resample: Image.Resampling
                   ) -> tuple[dict[str, ImageSplit], list[tuple[str, str]]]:
    """Decode every split in one thread pool (PIL releases the GIL while decoding and resizing)."""
    out = {split: torch.empty(len(its), 3, size, size, dtype=torch.uint8) for split, (its, _) in items.items()}
    errors: dict[str, list[str | None]] = {split: [None] * len(its) for split, (its, _) in items.items()}

    def work(job: tuple[str, int]) -> None:
        split, i = job
        try:
            out[split][i] = _decode_one(items[split][0][i], size, resample)
        except Exception as e:  # noqa: BLE001 - any failure means a bad file; report which
            errors[split][i] = (f"{type(e).__name__}: {e}".splitlines() or [""])[0]

    with ThreadPoolExecutor(max_workers=min(32, _cpus())) as pool:
        list(pool.map(work, [(split, i) for split, errs in errors.items() for i in range(len(errs))]))

    bad = [(items[s][0][i].name, e) for s, errs in errors.items() for i, e in enumerate(errs) if e is not None]
    splits = {}
    for split, (_, labels) in items.items():
        ok = torch.tensor([e is None for e in errors[split]], dtype=torch.bool)
        images = out[split] if ok.all() else out[split][ok]
        splits[split] = ImageSplit(images, torch.tensor(labels, dtype=torch.int64)[ok])
    return splits, bad


def _bad_images_error(bad: list[tuple[str, str]]) -> DataError:
    name, reason = bad[0]
    more, it = (f" and {len(bad) - 1} more", "them") if len(bad) > 1 else ("", "it")
    return DataError(f"cannot decode image {name} ({reason}){more}; fix or remove {it}, "
                     "or pass --skip_bad_images to skip unreadable images")


def _log_skipped(bad: list[tuple[str, str]], log: Callable[[str], None]) -> None:
    if bad:
        log(f"data: skipped {len(bad)} unreadable image(s), e.g. {bad[0][0]} ({bad[0][1]})")


def _summary(ds: ImageDataset) -> str:
    sizes = ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items())
    return f"{sizes}; {len(ds.label_names)} classes"


# ---------------------------------------------------------------------------- cache

def _write_cache(path: Path, ds: ImageDataset, bad: list[tuple[str, str]]) -> None:
    """Write to a temp file in the same folder, then os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, "fingerprint": ds.fingerprint, "label_names": ds.label_names,
               "bad": [list(b) for b in bad],
               "splits": {k: {"images": s.images, "labels": s.labels} for k, s in ds.splits.items()}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path, fingerprint: str, log: Callable[[str], None]) -> dict | None:
    """The cached dataset as ImageDataset kwargs plus 'bad', or None (with a log line) if unusable."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["format"] != FORMAT_VERSION or payload["fingerprint"] != fingerprint:
            raise ValueError("format or fingerprint mismatch")
        splits = {k: ImageSplit(v["images"], v["labels"]) for k, v in payload["splits"].items()}
        bad = [tuple(b) for b in payload["bad"]]
        return dict(splits=splits, label_names=list(payload["label_names"]), fingerprint=fingerprint,
                    skipped=[name for name, _ in bad], bad=bad)
    except Exception as e:  # noqa: BLE001 - a bad cache is rebuilt, never fatal
        log(f"data: cache {path} is unusable ({type(e).__name__}: {e}); rebuilding it")
        return None


def require_image_files(paths: list[str | Path]) -> None:
    """`vitboost predict` checks its images before it loads a model: a typo costs no model load."""
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"image {path} does not exist; pass existing image files")


def decode_image(path: str | Path, size: int, resample: str = "bilinear") -> torch.Tensor:
    """One image file -> uint8 [3, size, size], exactly as the dataset cache decodes it."""
    path = Path(path)
    require_image_files([path])
    try:
        return _decode_one(_Item(str(path), path=path), size, RESAMPLE[resample])
    except Exception as e:
        raise DataError(f"cannot decode image {path} ({type(e).__name__}); pass a valid image file") from None
