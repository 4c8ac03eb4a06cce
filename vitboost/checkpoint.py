"""Checkpoints with torch.distributed.checkpoint (DCP): save under one layout, resume under another.

Model and optimizer state are keyed by the HF parameter names (optimizer state flattened per
parameter), so a checkpoint written by a pp=2 job, each rank holding half the blocks, loads
into a single process and the other way round. Every checkpoint is written to a hidden
temporary folder and renamed when complete: a kill mid-write leaves the previous one intact.

Writes are asynchronous by default (``--async_checkpoint``): the state is copied to host memory
at the step it belongs to, a background thread writes it (over its own gloo group, so it never
interleaves with training collectives), and rank 0 renames the folder once DCP has written the
metadata, which DCP does only after every rank's shards are on disk. Training goes on meanwhile;
``finish_pending()`` waits for the last write before anything reads it (export, the next save).

    <output>/checkpoints/step_00000120/
        .metadata, __0_0.distcp ...   DCP shards: {"model": ..., "optim": ...}
        trainer.pt                    step, epoch, position in the epoch, scheduler, scaler, layout
        rng_<rank>.pt                 per-rank RNG (torch, cuda, augmentation) for bitwise resume
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
PREFIX, TMP_PREFIX = "step_", ".tmp_step_"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "trainer.pt").is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root (temporary folders are ignored)."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and is_complete(p))
    return done[-1] if done else None


@dataclass
class _Pending:
    future: Future
    tmp: Path
    final: Path
    keep: int


_pending: _Pending | None = None  # this process's checkpoint being written in the background
_save_group = None  # the gloo group background writes use (made once, collectively)


def save_checkpoint(root: Path, step: int, engine, trainer_state: dict, rng_state: dict, keep: int = 2,
                    blocking: bool = True) -> Path:
    """Write a checkpoint (collective: every rank calls it). ``blocking=False`` returns once the
    state is copied to host memory; the folder appears under its final name when the write ends."""
    global _pending, _save_group
    finish_pending()  # one write at a time, in order
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"{PREFIX}{step:08d}", root / f"{TMP_PREFIX}{step:08d}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    # the small files first: once DCP's metadata exists, the folder is complete
    _save_synced(rng_state, tmp / f"rng_{_rank()}.pt")
    if _rank() == 0:
        _save_synced(trainer_state, tmp / "trainer.pt")
    _barrier()
    state = _state(engine)
    if blocking:
        dcp.save(state, checkpoint_id=tmp)  # DCP's file writer fsyncs its own files
        future: Future = Future()
        future.set_result(None)
    else:
        if _save_group is None and dist.is_initialized():
            _save_group = dist.new_group(backend="gloo")
        future = dcp.async_save(state, checkpoint_id=tmp, process_group=_save_group)
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
        _pending.future.result()  # a failed write raises here
        if _rank() == 0:
            _publish(_pending.tmp, _pending.final, _pending.keep)
        _pending = None


def finish_pending() -> None:
    """Collective: wait for the background write, if any, and publish it."""
    if _pending is not None:
        _pending.future.result()
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
        except Exception:  # the run is already failing or over; its previous checkpoint stands
            pass
    _pending, _save_group = None, None


def _publish(tmp: Path, final: Path, keep: int) -> None:
    """Rank 0: the complete temporary folder takes its final name; old checkpoints beyond keep go."""
    _fsync(tmp)  # this folder only, not a whole-system sync of every disk
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(final.parent)  # the rename itself
    for old in sorted(p for p in final.parent.iterdir() if p.name.startswith(PREFIX))[:-keep] if keep > 0 else []:
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
    torch.save(obj, path)
    _fsync(path)


def _state(engine) -> dict:
    """What DCP saves and loads: model, optimizer and, when on, the weight EMA (loaded in place)."""
    state = {"model": engine.model_state(), "optim": _optim_state(engine)}
    if engine.ema is not None:
        state["ema"] = engine.ema.state_dict()
    return state


def _optim_state(engine) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    opt, model = engine.optimizer_and_model()
    return get_optimizer_state_dict(model, opt, options=FLAT)


def load_checkpoint(path: Path, engine) -> tuple[dict, dict | None]:
    """Load model + optimizer into the engine; return (trainer_state, this rank's RNG state or None)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    state = _state(engine)
    dcp.load(state, checkpoint_id=path)
    engine.load_model_state(state["model"])
    opt, model = engine.optimizer_and_model()
    set_optimizer_state_dict(model, opt, state["optim"], options=FLAT)
    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    rng_file = path / f"rng_{_rank()}.pt"
    same_layout = trainer_state.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1)
    rng = torch.load(rng_file, weights_only=True) if same_layout and rng_file.is_file() else None
    return trainer_state, rng


def load_model_weights(path: Path, model: torch.nn.Module, ema: bool = False) -> None:
    """Single process, no process group: fill a plain HF model from a checkpoint (for export/eval);
    ``ema``: the run kept a weight EMA, which is what gets exported."""
    import warnings
    state = {"model": model.state_dict()}
    if ema:
        state["ema"] = {n: torch.empty_like(p) for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state["model"])
    if ema:
        model.load_state_dict(state["ema"], strict=False)
