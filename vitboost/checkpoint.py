"""Checkpoints with torch.distributed.checkpoint (DCP): save under one layout, resume under another.

Model and optimizer state are keyed by the HF parameter names (optimizer state flattened per
parameter), so a checkpoint written by a pp=2 job, each rank holding half the blocks, loads
into a single process and the other way round. Every checkpoint is written to a hidden
temporary folder and renamed when complete: a kill mid-write leaves the previous one intact,
and a finished checkpoint is never deleted before its replacement is in place.

Writes are asynchronous by default (``--async_checkpoint``): the state is copied to host memory
at the step it belongs to, a background thread writes it (over its own gloo group, so it never
interleaves with training collectives), and rank 0 renames the folder once DCP has written the
metadata, which DCP does only after every rank's shards are on disk. Training goes on meanwhile;
``finish_pending()`` waits for the last write before anything reads it (export, the next save).
A write that fails for lack of space (or any storage error) removes its half-written folder and
ends the run in one line naming the last good checkpoint.

Loading trusts nothing in the folder. DCP reads ``.metadata`` with plain ``pickle.load`` and the
small values of the shards with ``torch.load(weights_only=False)``: either would run code from a
crafted checkpoint. Here ``.metadata`` goes through an unpickler that admits only DCP's metadata
classes and torch's sizes and dtypes, and every value through ``torch.load(weights_only=True)``.
Before anything is loaded the folder is checked (metadata readable, every shard present and long
enough, trainer.pt and this rank's RNG file readable), on every rank, and the ranks agree:
``--resume auto`` and export fall back to the newest checkpoint that loads, saying which they
skipped and why.

    <output>/checkpoints/step_00000120/
        .metadata, __0_0.distcp ...   DCP shards: {"model": ..., "optim": ...}
        trainer.pt                    step, epoch, position in the epoch, scheduler, scaler, layout
        rng_<rank>.pt                 per-rank RNG (torch, cuda, augmentation) for bitwise resume
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions

from .best import KEY as BEST
from .parallel.dims import any_rank
from .storage import CheckpointError, io_failure, write_synced

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
PREFIX, TMP_PREFIX, OLD_PREFIX = "step_", ".tmp_step_", ".old_step_"
TRAINER_KEYS = ("step", "epoch", "batch_in_epoch", "scheduler")


class DamagedCheckpoint(CheckpointError):
    """A folder that cannot be loaded (damaged, incomplete or unsafe); ``reason`` says why, in a few words."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"checkpoint {path} cannot be loaded: {reason}")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "trainer.pt").is_file()


def candidates(root: Path) -> list[Path]:
    """Every published checkpoint folder under root, newest first (damaged ones included)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir()), reverse=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root (temporary folders are ignored)."""
    done = [p for p in candidates(root) if is_complete(p)]
    return done[0] if done else None


# ---------------------------------------------------------------------------- reading, without running code

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_PATHS = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
_ADMITTED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
             ("builtins", "frozenset"),
             *((m, c) for m in ("pathlib", "pathlib._local") for c in _PATHS)}  # StorageMeta.checkpoint_id


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP metadata is made of (its dataclasses, torch.Size, dtypes, paths, containers);
    any other global (os.system, builtins.eval, ...) is refused before it can be called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ADMITTED or self._dcp_class(module, name) or self._torch_constant(module, name):
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _dcp_enum_member
        raise _Refused(f"{module}.{name}")

    @staticmethod
    def _dcp_class(module: str, name: str) -> bool:
        import torch.distributed.checkpoint.metadata as md
        obj = getattr(md, name, None) if module == _METADATA_MODULE else None
        return isinstance(obj, type) and obj.__module__ == _METADATA_MODULE

    @staticmethod
    def _torch_constant(module: str, name: str) -> bool:  # torch.float32, torch.strided, torch.channels_last
        return module == "torch" and isinstance(getattr(torch, name, None),
                                                (torch.dtype, torch.layout, torch.memory_format))


def _dcp_enum_member(cls, name):
    """Early Python 3.11 releases (3.11.2, Debian 12's, seen; 3.11.7 and 3.12 do not) pickle an enum member as
    ``getattr(EnumClass, "NAME")`` instead of ``EnumClass(value)``: DCP's ``_MEM_FORMAT_ENCODING`` in every
    tensor's properties. Only that form is admitted: a member, by name, of an enum that DCP's metadata module
    defines; any other getattr is refused."""
    import enum
    if (isinstance(cls, type) and issubclass(cls, enum.Enum) and cls.__module__ == _METADATA_MODULE
            and isinstance(name, str) and name in cls.__members__):
        return cls[name]
    raise _Refused(f"builtins.getattr({getattr(cls, '__qualname__', type(cls).__name__)}, {name!r})")


class _SafeReader(FileSystemReader):
    """DCP's file reader, handed the metadata that was already read (and checked) without running code."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never looks for per-rank metadata files
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, except that non-tensor values (optimizer hyper-parameters) are read with
    weights_only=True: DCP's own load_bytes uses weights_only=False, which runs code from the file."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # refuses anything but plain data
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def read_metadata(path: Path) -> Metadata:
    """The folder's DCP metadata, read without executing code; DamagedCheckpoint if unusable."""
    if not path.is_dir():
        raise DamagedCheckpoint(path, "it does not exist" if not path.exists() else "it is not a folder")
    f = path / ".metadata"
    if not f.is_file():
        raise DamagedCheckpoint(path, "it has no .metadata (not a checkpoint folder, or its write never finished)")
    try:
        with open(f, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except _Refused as e:
        raise DamagedCheckpoint(path, f"its .metadata was refused: it calls {e}, which DCP metadata never contains "
                                      f"(vitboost never runs code from a checkpoint)") from None
    except Exception as e:  # noqa: BLE001 - empty, truncated, corrupt: all mean the same to the user
        what = "empty" if f.stat().st_size == 0 else f"truncated or corrupt ({type(e).__name__})"
        raise DamagedCheckpoint(path, f"its .metadata is {what}") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise DamagedCheckpoint(path, "its .metadata is not DCP metadata")
    return md


def _check_shards(path: Path, md: Metadata) -> None:
    """Every shard the metadata points at is in the folder and long enough (a cheap stat, no read)."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        if not isinstance(info, _StorageInfo):
            raise DamagedCheckpoint(path, "its .metadata is not DCP metadata")
        rel = str(info.relative_path)
        if Path(rel).name != rel or rel in ("", ".", ".."):
            raise DamagedCheckpoint(path, f"its .metadata points outside the folder ({rel!r})")
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            raise DamagedCheckpoint(path, f"shard {rel} is missing")
        have = f.stat().st_size
        if have < size:
            raise DamagedCheckpoint(path, f"shard {rel} is truncated ({have} of {size} bytes)")


def _load_small(path: Path, name: str) -> dict:
    """trainer.pt or an RNG file, plain data only."""
    f = path / name
    if not f.is_file():
        raise DamagedCheckpoint(path, f"{name} is missing")
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DamagedCheckpoint(path, f"{name} was refused: it is not plain data "
                                      f"(vitboost never runs code from a checkpoint)") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad magic, ...
        raise DamagedCheckpoint(path, f"{name} is truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise DamagedCheckpoint(path, f"{name} is not a vitboost state")
    return obj


def _failure(e: CheckpointException) -> str:
    """What went wrong in a DCP load, in a few words."""
    for exc, *_ in e.failures.values():
        if isinstance(exc, pickle.UnpicklingError):
            return "a value in its shards was refused: it is not plain data (vitboost never runs code from a checkpoint)"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"its shards do not load ({type(exc).__name__}: {first})"
    return "its shards do not load"


def _agree(problem: str | None) -> str | None:
    """Every rank's verdict on a checkpoint -> one verdict on all ranks (the first problem, if any), so
    that all of them load the same checkpoint or all of them skip it."""
    if _world() == 1:
        return problem
    verdicts: list[str | None] = [None] * _world()
    dist.all_gather_object(verdicts, problem)
    return next((v + (f" (on rank {r})" if r else "") for r, v in enumerate(verdicts) if v), None)


def load_checkpoint(path: Path, engine) -> tuple[dict, dict | None]:
    """Load model + optimizer into the engine; return (trainer_state, this rank's RNG state, or None when
    the checkpoint was written by another world size). Collective. A folder that cannot be loaded raises
    DamagedCheckpoint on every rank alike, checked before anything is loaded where a stat or a small
    read can tell."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    md = trainer_state = rng = None
    problem = None
    try:
        md = read_metadata(path)
        _check_shards(path, md)
        trainer_state = _load_small(path, "trainer.pt")
        missing = [k for k in TRAINER_KEYS if k not in trainer_state]
        if missing:
            raise DamagedCheckpoint(path, f"trainer.pt lacks {', '.join(missing)}")
        if trainer_state.get("world_size") == _world():  # same layout: its RNG continues bitwise
            rng = _load_small(path, f"rng_{_rank()}.pt")
    except DamagedCheckpoint as e:
        problem = e.reason
    problem = _agree(problem)
    if problem:
        raise DamagedCheckpoint(path, problem)
    state = _state(engine)
    if BEST in state and not _holds(md, BEST):
        del state[BEST]  # written without --load_best_model_at_end: the run picks from its own validations
    try:
        dcp.load(state, storage_reader=_SafeReader(path, md), planner=_SafePlanner())
    except CheckpointException as e:  # raised on every rank: DCP gathers the read results
        raise DamagedCheckpoint(path, _failure(e)) from None
    engine.load_model_state(state["model"])
    opt, model = engine.optimizer_and_model()
    set_optimizer_state_dict(model, opt, state["optim"], options=FLAT)
    return trainer_state, rng


def resume_checkpoint(spec: str, root: Path, engine, log: Callable[[str], None] = print
                      ) -> tuple[Path, dict, dict | None] | None:
    """``--resume FOLDER``: that checkpoint, or one CheckpointError line. ``--resume auto``: the newest
    checkpoint under root that loads, saying which it skipped and why; None when there is none."""
    if _rank() == 0:
        prune(root, keep=0)  # leftovers of killed writes go; a checkpoint left moved aside comes back
    _barrier()
    found = None
    if spec != "auto":
        try:
            found = (Path(spec), *load_checkpoint(Path(spec), engine))
        except DamagedCheckpoint as e:
            raise CheckpointError(f"cannot resume from {spec}: {e.reason}; pass another checkpoint folder "
                                  f"({root}/step_*) or --resume auto, which skips damaged ones") from None
    skipped: list[str] = []
    for path in candidates(root) if spec == "auto" else []:
        try:
            found = (path, *load_checkpoint(path, engine))
            break
        except DamagedCheckpoint as e:
            log(f"--resume auto: skipping {path}: {e.reason}")
            skipped.append(f"{path.name}: {e.reason}")
    if found is None and skipped:
        raise CheckpointError(f"--resume auto: no checkpoint in {root} can be loaded ({'; '.join(skipped[:3])}); "
                              f"pass --overwrite to start over")
    if found is not None and found[2] is None:
        log(f"{found[0]} was written by {found[1].get('world_size')} processes, this run has {_world()}: the per-rank "
            f"random streams (augmentation, dropout) start afresh from this run's seeds")
    return found


def load_model_weights(path: Path, model: torch.nn.Module, ema: bool = False) -> None:
    """Single process, no process group: fill a plain HF model from a checkpoint (for export/eval);
    ``ema``: the run kept a weight EMA, which is what gets exported; a run with --load_best_model_at_end
    exports its best validation's weights so far instead. Raises DamagedCheckpoint for a folder that
    cannot be loaded."""
    import warnings
    md = read_metadata(path)
    _check_shards(path, md)
    state = {"model": model.state_dict()}
    kept = BEST if _has_best(path, md) else "ema" if ema else None  # the weights exported instead of the raw ones
    if kept:  # own storage: they must not land in the tensors the raw weights load into
        state[kept] = {n: torch.empty_like(p) for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            dcp.load(state, storage_reader=_SafeReader(path, md), planner=_SafePlanner(), no_dist=True)
        except CheckpointException as e:
            raise DamagedCheckpoint(path, _failure(e)) from None
    model.load_state_dict(state["model"])
    if kept:
        model.load_state_dict(state[kept], strict=False)


def _has_best(path: Path, md: Metadata) -> bool:
    """Whether the checkpoint holds best-validation weights chosen by a validation (before the first
    one, its ``best`` tensors are only the initial weights)."""
    return _holds(md, BEST) and (_load_small(path, "trainer.pt").get(BEST) or {}).get("value") is not None


def _holds(md: Metadata, key: str) -> bool:
    """Whether the checkpoint saved anything under this top-level key of its state (e.g. "best")."""
    return any(k.startswith(f"{key}.") for k in md.state_dict_metadata)


# ---------------------------------------------------------------------------- writing


@dataclass
class _Pending:
    future: Future
    tmp: Path
    final: Path
    keep: int


# each rank's shard written as this many files by as many threads: ViT-B's state (1.03 GB) took 1.29-2.06 s
# with DCP's default of one on the H200 host, 0.75-0.78 s with 4 (0.70-0.73 with 8); BENCHMARKS.md section 29
WRITE_THREADS = 4

_pending: _Pending | None = None  # this process's checkpoint being written in the background
_save_group = None  # the gloo group background writes use (made once, collectively)


def save_checkpoint(root: Path, step: int, engine, trainer_state: dict, rng_state: dict, keep: int = 2,
                    blocking: bool = True) -> Path:
    """Write a checkpoint (collective: every rank calls it). ``blocking=False`` returns once the
    state is copied to host memory; the folder appears under its final name when the write ends.
    A storage failure removes the half-written folder and raises one CheckpointError line."""
    global _pending, _save_group
    finish_pending()  # one write at a time, in order
    final, tmp = root / f"{PREFIX}{step:08d}", root / f"{TMP_PREFIX}{step:08d}"
    try:
        if _rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        # the small files first: once DCP's metadata exists, the folder is complete
        _save_synced(rng_state, tmp / f"rng_{_rank()}.pt")
        if _rank() == 0:
            _save_synced(trainer_state, tmp / "trainer.pt")
        _barrier()
        state = _state(engine)
        # named: DCP would otherwise import fsspec (~0.2 s) to pick one
        writer = FileSystemWriter(tmp, thread_count=WRITE_THREADS)
        if blocking:
            dcp.save(state, checkpoint_id=tmp, storage_writer=writer)  # DCP's file writer fsyncs its own files
            future: Future = Future()
            future.set_result(None)
        else:
            if _save_group is None and dist.is_initialized():
                _save_group = dist.new_group(backend="gloo")
            future = dcp.async_save(state, checkpoint_id=tmp, storage_writer=writer, process_group=_save_group)
    except BaseException as e:
        raise _write_failed(e, tmp, final) from None
    _pending = _Pending(future, tmp, final, keep)
    if blocking:
        finish_pending()  # the one publishing path, for both modes
    return final


def publish_finished() -> None:
    """Non-blocking, call it every step: rank 0 renames a finished background write into place.
    DCP writes the metadata only after every rank's shards, so rank 0's write finishing means all
    ranks' have; other ranks just forget theirs."""
    global _pending
    if _pending is not None and _pending.future.done():
        done, _pending = _pending, None
        try:
            done.future.result()  # a failed write raises here
            if _rank() == 0:
                _publish(done.tmp, done.final, done.keep)
        except BaseException as e:
            raise _write_failed(e, done.tmp, done.final) from None


def writing() -> bool:
    """Collective: whether a background write is still running on any rank (all ranks get the same answer)."""
    return any_rank(_pending is not None and not _pending.future.done())


def finish_pending() -> None:
    """Collective: wait for the background write, if any, and publish it."""
    if _pending is not None:
        wait([_pending.future])  # a failure is raised (in one line) by publish_finished below
    _barrier()
    publish_finished()
    _barrier()


def close() -> None:
    """Before the process group goes away (end of a run, or an error): let a write in flight end,
    unpublished if the run failed, and forget the group so the next run in this process makes its own."""
    global _pending, _save_group
    if _pending is not None:
        try:
            _pending.future.result()
        except (Exception, CheckpointException):  # the run is already failing or over; its previous checkpoint stands
            pass
    _pending, _save_group = None, None


def _write_failed(exc: BaseException, tmp: Path, final: Path) -> BaseException:
    """A write that failed for a storage reason: remove its half-written folder and say what could not be
    written and what is still good. Anything else is handed back as it is (a bug keeps its traceback)."""
    reason = io_failure(exc, tmp)
    if reason is None:
        return exc
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    last = latest_checkpoint(final.parent)
    good = f"the last good checkpoint is {last}" if last else "there is no earlier checkpoint"
    return CheckpointError(f"cannot write checkpoint {final} ({reason}); {good}; free some space, then continue "
                           f"with --resume auto")


def _publish(tmp: Path, final: Path, keep: int) -> None:
    """Rank 0: the complete temporary folder takes its final name; old checkpoints beyond keep go.
    A finished checkpoint of the same step (a run resumed from an older one) is moved aside, not
    deleted, until the new one is in place."""
    _fsync(tmp)  # this folder only, not a whole-system sync of every disk
    aside = final.with_name(OLD_PREFIX + final.name[len(PREFIX):])
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    try:
        tmp.rename(final)
    except OSError:
        if aside.exists() and not final.exists():
            aside.rename(final)
        raise
    _fsync(final.parent)  # the rename itself
    prune(final.parent, keep)


def prune(root: Path, keep: int) -> None:
    """Rank 0, with no write in flight: drop checkpoints beyond the newest ``keep`` (0: keep all) and
    the leftovers of killed writes (.tmp_step_*, which can be hundreds of MB each). A checkpoint moved
    aside whose replacement never arrived is put back instead."""
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith(OLD_PREFIX):
            final = root / (PREFIX + p.name[len(OLD_PREFIX):])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.rename(final)
        elif p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
    done = candidates(root)
    for old in done[keep:] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk, so a rename never exposes an incomplete checkpoint."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms; the files were synced already
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_synced(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_synced(buf.getvalue(), path)


def _state(engine) -> dict:
    """What DCP saves and loads: model, optimizer and, when on, the weight EMA (loaded in place)."""
    state = {"model": engine.model_state(), "optim": _optim_state(engine)}
    if engine.ema is not None:
        state["ema"] = engine.ema.state_dict()
    if engine.best is not None:  # --load_best_model_at_end: the best validation's weights so far
        state[BEST] = engine.best.state_dict()
    return state


def _optim_state(engine) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    opt, model = engine.optimizer_and_model()
    return get_optimizer_state_dict(model, opt, options=FLAT)
