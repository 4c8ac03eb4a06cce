"""The training loop. It reads top to bottom and does not know which strategy runs it.

    setup (process group, mesh, data, model, engine) -> resume? -> epochs of steps
      -> eval each epoch -> checkpoint -> final eval (validation, test) -> last checkpoint -> export, summary

summary.json's ``timings_s`` breaks the run down by phase, from the process's start (``launch``:
interpreter, imports, argument parsing; a torchrun rank counts from its launcher's start) to the export.

Every rank sees the same global batch indices (same seed); each data-parallel rank takes
its contiguous slice, so a run on N GPUs computes the same global-batch mean loss as one
process on the whole batch. Tensor and pipeline ranks of one dp group take the same slice.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .augment import AugmentConfig, GpuAugment, soft_cross_entropy
from .batches import TrainBatches
from .checkpoint import close as close_checkpoints
from .checkpoint import finish_pending, latest_checkpoint, publish_finished, resume_checkpoint, save_checkpoint, writing
from .compile_ahead import compile_ahead
from .config import ConfigError, TrainConfig, check_patch_grid
from .data import ImageDataset, ImageSplit, load_image_dataset, num_batches
from .distill import check_teacher, make_distiller
from .engine import Engine, lr_schedule
from .evaluate import batches_per_rank, evaluate
from .lora import apply_lora, check_resume as check_lora_resume
from .model import Preprocess, build_model
from .export import export_checkpoint, export_state, save_run_config
from .regularize import apply_drop_path
from .report import make_sinks
from .parallel.dims import ParallelDims, PeerFailed, any_rank, init_distributed, world_info
from .parallel.plan import make_plan, model_dims, plan_step
from .preempt import Preemption, restore_signals
from .storage import WriteError, uncreatable
from .trainstate import TrainState, trim_metrics

RUN_MARKER = "config.yaml"


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def set_tf32(enabled: bool) -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores (Ampere and newer), as HF Trainer's --tf32.
    bf16/fp16 autocast runs are unaffected; fp32 runs get ~3x the matmul rate for ~1e-3 relative error."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def init_device(device: torch.device, plugin: str) -> torch.device | None:
    """Where a random init runs: on the GPU it trains on, unless the plugin may be there because
    the model does not fit one (gemini, or auto, which can pick gemini): then on the CPU."""
    return device if device.type == "cuda" and plugin not in ("gemini", "auto") else None


def check_output(cfg: TrainConfig, is_main: bool) -> Path:
    """Refuse to mix two runs in one folder unless asked to resume or overwrite."""
    out = Path(cfg.output)
    if is_main:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output {out} is a file; pass a folder")
        why = uncreatable(out)
        if why:
            raise ConfigError(f"--output {out} cannot be created: {why}; pass a folder you can write to")
        holds_run = (out / RUN_MARKER).exists()
        if holds_run and cfg.resume is None and not cfg.overwrite:
            raise ConfigError(f"--output {out} already holds a run; pass --resume auto to continue it, "
                              f"--overwrite to replace it, or another --output")
    return out


def claim_output(cfg: TrainConfig, out: Path) -> None:
    """Create (or, with --overwrite, empty) the output folder once data and model are known good."""
    if cfg.overwrite and cfg.resume is None and (out / RUN_MARKER).exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


class Logger:
    """metrics.jsonl (one JSON object per line) and the --report_to sinks, written by rank 0 only."""

    def __init__(self, path: Path | None, sinks: list | None = None):
        self.f = open(path, "a") if path else None
        self.sinks = sinks or []

    def __call__(self, **row) -> None:
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        for sink in self.sinks:
            sink.log(row)

    def evaluation(self, split: str, step: int, metrics: dict, final: bool = False) -> None:
        """What only the sinks take: confusion matrices, and the final evaluation."""
        for sink in self.sinks:
            sink.evaluation(split, step, metrics, final)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class Meter:
    """Loss and img/s of the steps since the last log row. The loss is summed on the device, so a step
    costs no host sync; the one sync is the log row's (every --log_every steps)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.images, self.since = torch.zeros((), device=self.device), 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss += loss
        self.steps += 1
        self.images += images

    def row(self, step: int, epoch: int, lr: float, grad_norm: torch.Tensor, dp_group) -> dict:
        """The metrics.jsonl row (loss averaged over the dp ranks), and a new window."""
        loss = _dp_mean(self.loss / self.steps, dp_group)
        row = {"step": step, "epoch": epoch, "loss": round(loss, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
               "img_per_s": round(self.images / (time.perf_counter() - self.since), 1)}
        self._reset()
        return row


class Progress:
    """What rank 0 shows while training: a live bar on a terminal; in a log file, a plain line about 20 times
    per run instead (--no-progress: neither). Other ranks show nothing."""

    def __init__(self, cfg: TrainConfig, is_main: bool, step: int, total_steps: int):
        from tqdm.auto import tqdm
        live = is_main and cfg.progress and sys.stdout.isatty()
        self.bar = tqdm(total=total_steps, initial=step, disable=not live, dynamic_ncols=True, file=sys.stdout,
                        desc="train")
        self.lines = is_main and cfg.progress and not live
        self.every, self.log_every, self.total = max(cfg.log_every, total_steps // 20), cfg.log_every, total_steps
        self.write = self.bar.write if is_main else (lambda *a, **k: None)  # a line that keeps the bar intact

    def logged(self, row: dict) -> None:
        """A metrics row: the bar's figures, and a plain line when one is due."""
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.0f}")
        step = row["step"]
        if self.lines and (step % self.every < self.log_every or step == self.total):
            print(f"step {step}/{self.total} epoch {row['epoch']} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                  f"grad_norm {row['grad_norm']:.3f} img/s {row['img_per_s']:.0f}", flush=True)


class RunClock:
    """Where a run's time goes, for summary.json: ``phases`` (timings_s), seconds per phase from the
    process's start (launched, on time.perf_counter's clock); ``inside_train`` (train_breakdown_s), the
    train phase's seconds spent in epoch-end validations and checkpoints, each timed from a device sync
    so queued steps are not counted (train_breakdown() adds the rest as steps); ``launch_marks``
    (launch_marks_s), when the CLI's steps inside the launch ended, in seconds from the launch
    (a machine's first run spends its launch there: disk reads, bytecode, the driver)."""

    def __init__(self, launched: float | None, marks: dict[str, float] | None = None):
        self.last = time.perf_counter()
        self.launched = self.last if launched is None else launched
        self.phases = {"launch": round(self.last - self.launched, 3)}
        self.launch_marks = {k: round(t - self.launched, 3) for k, t in sorted((marks or {}).items(), key=lambda m: m[1])}
        self.inside_train = {"validation": 0.0, "checkpoints": 0.0}
        self.device: torch.device | None = None

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase], self.last = round(now - self.last, 3), now

    @contextlib.contextmanager
    def inside(self, part: str):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if part in self.inside_train and "train" not in self.phases:
            self.inside_train[part] += time.perf_counter() - t0

    def train_breakdown(self) -> dict[str, float]:
        """The train phase as steps, validation and checkpoints (after lap("train"))."""
        parts = {k: round(v, 3) for k, v in self.inside_train.items()}
        return {**parts, "steps": round(self.phases["train"] - sum(parts.values()), 3)}

    def since_launch(self) -> float:
        """Up to the last lap."""
        return round(self.last - self.launched, 2)


class Evaluations:
    """The run's evaluations on the model as it trains (the EMA weights under --ema): the validations
    after epochs (--eval_every) and steps (--eval_steps), which also pick the best weights
    (--load_best_model_at_end) and decide early stopping, and the final validation and test, which
    reuse a validation of the same weights."""

    def __init__(self, engine: Engine, data: ImageDataset, cfg: TrainConfig, pre: Preprocess, dims: ParallelDims,
                 dp_rank: int, dp_group, log: Logger, history: list[dict]):
        self.engine, self.data, self.cfg, self.pre, self.dims = engine, data, cfg, pre, dims
        self.dp_rank, self.dp_group, self.log = dp_rank, dp_group, log
        self.history = history  # the validations so far, for summary.json (a resumed run's earlier ones too)
        self.latest: dict[int, dict] = {}  # {step: metrics} of the latest validation

    def __call__(self, split: str) -> dict:
        with self.engine.eval_weights():  # the EMA weights when --ema: what gets exported
            return evaluate(self.engine, self.data.splits[split], self.data.label_names,
                            batch_size=self.cfg.eval_batch_size, mean=self.pre.mean, std=self.pre.std,
                            dp_rank=self.dp_rank, dp_size=self.dims.dp, dp_group=self.dp_group)

    def due(self, epoch: int) -> bool:
        """Whether a validation follows the ``epoch``-th epoch (--eval_every)."""
        return bool(self.cfg.eval_every) and epoch % self.cfg.eval_every == 0 and "validation" in self.data.splits

    def due_at_step(self, step: int, epoch: int, ends_epoch: bool) -> bool:
        """Whether a validation follows this step (--eval_steps); not where the epoch it ends (``epoch``
        epochs done before it) has its own validation due: one validation a step."""
        return (self.cfg.eval_steps > 0 and step % self.cfg.eval_steps == 0 and "validation" in self.data.splits
                and not (ends_epoch and self.due(epoch + 1)))

    def validate(self, step: int, epoch: float, write, at_step: bool = False) -> bool:
        """The validation at ``epoch`` (epochs done: a fraction mid-epoch, after a step's validation);
        True when --early_stopping_patience ends the run. A step's row is marked ``at_step``: a resumed run
        keeps it by its step (an epoch's row: by its epoch, metrics.jsonl's trim)."""
        epoch = round(epoch, 4)  # as the history and the best model record it
        m = self("validation")
        self.latest = {step: m}
        row = {"epoch": epoch, "step": step, "val_loss": m["loss"], "val_accuracy": m["accuracy"]}
        self.history.append({**row, "at_step": True} if at_step else row)
        self.log(**self.history[-1])
        self.log.evaluation("validation", step, m)
        where = f"step {step} (epoch {epoch:.2f})" if at_step else f"epoch {epoch}"
        write(f"{where}: validation loss {m['loss']:.4f} accuracy {m['accuracy']:.4f}")
        best = self.engine.best
        if best is None:
            return False
        best.consider(step, epoch, m, self.engine.eval_weights)
        return 0 < self.cfg.early_stopping_patience <= best.stale

    def restore_best(self, step: int, say) -> None:
        """Put the best validation's weights in the model: the final evaluation and the export use them."""
        best = self.engine.best
        if best is not None and best.restore(self.engine.ema):
            self.latest = {step: best.metrics}
            say(f"best model: epoch {best.epoch:g} (step {best.step}), validation {self.cfg.metric_for_best_model} "
                f"{best.value:.4f}: tested and exported")

    def final(self, step: int, say) -> dict[str, dict]:
        """Validation and test of the weights the run ends with (a validation at this step is reused)."""
        results = {}
        for split in ("validation", "test"):
            if split in self.data.splits:
                reused = self.latest.get(step) if split == "validation" else None
                m = results[split] = reused or self(split)
                say(f"eval accuracy: {m['accuracy']:.4f} ({split}, {m['num_samples']} images)")
                self.log.evaluation(split, step, m, final=True)
        return results


def train(cfg: TrainConfig, launched: float | None = None, launch_marks: dict[str, float] | None = None) -> dict:
    """launched: when the process started (time.perf_counter's clock), for the ``launch`` phase;
    launch_marks: when the CLI's steps inside it ended, on the same clock."""
    clock = RunClock(launched, launch_marks)
    lap = clock.lap
    rank, local_rank, world = world_info()
    device = clock.device = pick_device(cfg.device, local_rank)
    set_tf32(cfg.tf32)
    init_distributed(device.type)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    dims = ParallelDims(world, tp=cfg.tp_size, pp=cfg.pp_size)
    dims.build_mesh(device.type)
    dp_rank = dims.mesh["dp"].get_local_rank()
    dp_group = dims.mesh["dp"].get_group() if dims.dp_enabled else None
    out = check_output(cfg, is_main)
    check_teacher(cfg)
    lap("startup")

    # model config first: the input size and normalization come from it
    torch.manual_seed(cfg.seed)  # the same random stream on every rank from the start
    size = _model_image_size(cfg)
    data = _load_data(cfg, size, is_main, say)
    lap("data")
    model, pre = _model(cfg, data.label_names, size, device, dims, out, say)
    plan = make_plan(cfg, device.type, world, sum(p.numel() for p in model.parameters()), model_dims(model.config))
    global_batch, steps_per_epoch, total_steps = _run_length(cfg, len(data.splits["train"]), dims.dp)
    plan = _plan_step(plan, cfg, device, total_steps, data, dims, say)
    if is_main:  # the input is known good (data, model, layout, step plan): only now is anything written
        claim_output(cfg, out)
        save_run_config(model, pre, out)  # before parallelization touches the model
    engine = Engine(model, cfg, dims, plan, device, soft_cross_entropy)
    say(f"strategy: {plan.plugin} (dp={dims.dp} tp={dims.tp} pp={dims.pp}, {plan.precision}) on {world} x {device.type}")
    scheduler = lr_schedule(engine.optimizer, total_steps, cfg.warmup(total_steps), cfg.lr_scheduler_type)
    augment = _augment(cfg, len(data.label_names), pre, dp_rank, device)
    train_split = _on_gpu_if_small(data.splits["train"], device)
    lap("model")
    ahead = compile_ahead(engine, cfg, size)  # the blocks' graph compiles while the teacher trains
    distiller, teacher = make_distiller(cfg, augment, train_split, data.splits, data.label_names, pre, device, out,
                                        is_main, say, beside=ahead.start if ahead else None)
    lap("teacher")
    if ahead is not None:
        ahead.join(say)
        lap("compile")
    batches = TrainBatches(train_split, augment, distiller, global_batch=global_batch,
                           per_epoch=steps_per_epoch * cfg.grad_accum, dp=dims.dp, dp_rank=dp_rank, seed=cfg.seed,
                           image_size=size, device=device)

    ckpt_root = out / "checkpoints"
    preempt = Preemption(every=cfg.log_every)  # SIGTERM/SIGUSR1: finish the step, checkpoint, exit
    state = TrainState(scheduler, batches, device, engine.scaler, engine.best)
    resumed = _resume(cfg, ckpt_root, engine, state, say)
    history = trim_metrics(out / "metrics.jsonl", state) if resumed and is_main else []  # one row per step
    step, epoch, batch_in_epoch = state.step, state.epoch, state.batch_in_epoch
    if is_main:
        cfg.save(out / RUN_MARKER)
    log = Logger(out / "metrics.jsonl" if is_main else None, make_sinks(
        cfg.report_to, out, data.label_names, step if resumed else None, say) if is_main else None)
    evals = Evaluations(engine, data, cfg, pre, dims, dp_rank, dp_group, log, history)

    pace = SavePace(cfg.save_min_seconds)  # --save_min_seconds, from the start of training

    def checkpoint(wait: bool = True) -> None:
        """Save this step, once (an epoch end can also be a --save_every step). wait=False: an epoch end
        before the last, which the pace (--save_min_seconds) or _writer_busy may skip."""
        if state.saved_step == step or (not wait and (pace.too_soon(say) or _writer_busy(cfg, step, say))):
            return
        # never a checkpoint of diverged weights
        _check_diverged(engine.loss_scale(), None if last_norm is None else float(last_norm), step, ckpt_root)
        state.step, state.epoch, state.batch_in_epoch = step, epoch, batch_in_epoch
        layout = {"world_size": world, "layout": [dims.dp, dims.tp, dims.pp], "plugin": plan.plugin}
        with clock.inside("checkpoints"):
            save_checkpoint(ckpt_root, step, engine, {**state.state_dict(), **layout}, state.rng_state_dict(),
                            keep=cfg.keep_checkpoints, blocking=not cfg.async_checkpoint)
        state.saved_step = step
        pace.saved()

    lap("resume")
    progress = Progress(cfg, is_main, step, total_steps)
    meter = Meter(device)
    stopped_early = False  # --early_stopping_patience
    last_norm = None  # the last step's global gradient norm (a device tensor)
    while epoch < cfg.epochs and step < total_steps and not preempt.stopped and not stopped_early:
        inputs = batches.epoch(epoch, start=batch_in_epoch)  # (model inputs, targets) on the device
        while batch_in_epoch + cfg.grad_accum <= batches.per_epoch and step < total_steps:
            micro_batches = []
            for _ in range(cfg.grad_accum):
                micro_batches.append(next(inputs))
                batch_in_epoch += 1
            step_loss, last_norm = engine.train_step(micro_batches)
            scheduler.step()
            step += 1
            meter.add(step_loss, global_batch * cfg.grad_accum)
            if step % cfg.log_every == 0 or step == total_steps:
                row = meter.row(step, epoch + 1, scheduler.get_last_lr()[0], last_norm, dp_group)
                if (scale := engine.loss_scale()) is not None:  # fp16
                    row["loss_scale"] = scale
                log(**row)
                progress.logged(row)
                _check_diverged(row.get("loss_scale"), row["grad_norm"], step, ckpt_root)  # the row's reads
            if evals.due_at_step(step, epoch, ends_epoch=batch_in_epoch + cfg.grad_accum > batches.per_epoch):
                with clock.inside("validation"):  # before this step's checkpoint, which then holds its effect
                    stopped_early = evals.validate(step, epoch + batch_in_epoch / batches.per_epoch,
                                                   progress.write, at_step=True)
            progress.bar.update(1)
            publish_finished()  # a background checkpoint write that ended takes its final name
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint()
            if preempt.should_stop(step) or stopped_early:
                break
        if batch_in_epoch >= batches.per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            if evals.due(epoch):
                with clock.inside("validation"):
                    stopped_early = evals.validate(step, epoch, progress.write)
            last_epoch = epoch == cfg.epochs or step >= total_steps or stopped_early
            if epoch % cfg.save_epochs == 0 and not last_epoch:  # the last state is saved after the final eval
                checkpoint(wait=False)
    progress.bar.close()
    if preempt.stopped:
        checkpoint()
        finish_pending()
        log.close()  # the --report_to sinks' buffered events: the process ends right after this
        raise preempt.exit(step, ckpt_root / f"step_{step:08d}", is_main)
    lap("train")
    if stopped_early:
        say(f"early stopping at epoch {epoch}: no better validation {cfg.metric_for_best_model} in "
            f"{cfg.early_stopping_patience} validations")
    if engine.best is not None:  # the last state first: it is what --resume continues from
        checkpoint()
        evals.restore_best(step, say)
    results = evals.final(step, say)
    log.close()
    lap("final_eval")
    to_accuracy = clock.since_launch()  # launch to printed accuracy: what a user waits for
    # the last state, saved once its accuracy is printed (HF Trainer's order too: evaluate, then save):
    # a write running beside the final eval slowed it 4x on CPU (BENCHMARKS.md section 22); on disk
    # before the export (which then has the disk to itself) and before the process exits
    checkpoint()
    finish_pending()
    lap("final_checkpoint")
    summary = _summary(cfg, plan, dims, world, device, step, clock, results, evals.history, data, teacher,
                       engine.best, stopped_early)
    export_error = _export(cfg, engine, out, ckpt_root / f"step_{step:08d}", say) if cfg.export and is_main else None
    lap("export")
    summary["timings_s"], summary["train_breakdown_s"] = clock.phases, clock.train_breakdown()
    summary["launch_marks_s"] = clock.launch_marks
    summary["seconds_to_accuracy"], summary["total_seconds"] = to_accuracy, round(time.perf_counter() - clock.launched, 2)
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.plot:
            from .plots import plot_run
            plot_run(out)
    _barrier()
    if export_error is not None:
        raise export_error
    return summary


def _plan_step(plan, cfg: TrainConfig, device: torch.device, total_steps: int, data: ImageDataset,
               dims: ParallelDims, say):
    """The step's compile / CUDA graph, which depend on the run's length; the strategy's choice and
    the step's are said with their reasons."""
    plan = plan_step(plan, cfg, device.type, total_steps, _eval_batches(cfg, data.splits, dims.dp, total_steps))
    for note in (plan.reason, *plan.step_notes):
        if note:
            say(note)
    return plan


def _augment(cfg: TrainConfig, num_labels: int, pre: Preprocess, dp_rank: int, device: torch.device) -> GpuAugment:
    """The --augment preset with the flags that override it; each data-parallel rank draws its own stream."""
    overrides = {"mixup_alpha": cfg.mixup, "cutmix_alpha": cfg.cutmix, "label_smoothing": cfg.label_smoothing}
    aug_cfg = AugmentConfig.preset(cfg.augment).with_(**{k: v for k, v in overrides.items() if v is not None})
    return GpuAugment(aug_cfg, num_labels, pre.mean, pre.std, seed=cfg.seed + 1000 * dp_rank, device=device)


def _resume(cfg: TrainConfig, ckpt_root: Path, engine: Engine, state: TrainState, say) -> bool:
    """--resume: load the newest checkpoint that loads (auto) or the one named into the engine and state."""
    found = resume_checkpoint(cfg.resume, ckpt_root, engine, say) if cfg.resume else None
    if not found:
        if cfg.resume == "auto":
            say(f"--resume auto: no checkpoint in {ckpt_root}; starting fresh")
        return False
    resume_from, trainer_state, rng = found
    state.load_state_dict(trainer_state)
    state.load_rng_state_dict(rng)
    say(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch_in_epoch})")
    return True


def _summary(cfg: TrainConfig, plan, dims: ParallelDims, world: int, device: torch.device, step: int,
             clock: RunClock, results: dict, history: list[dict], data: ImageDataset, teacher: dict | None,
             best, stopped_early: bool) -> dict:
    """summary.json, but for the timings (added once the export is done)."""
    summary = {"config": cfg.to_dict(), "strategy": {"plugin": plan.plugin, "precision": plan.precision,
               "dp": dims.dp, "tp": dims.tp, "pp": dims.pp, "world_size": world, "device": device.type},
               "steps": step, "train_seconds": round(clock.phases["train"], 2), "eval": results, "history": history,
               "skipped_images": data.skipped, **({"teacher": teacher} if teacher else {})}
    if best is not None:
        summary["best_model"] = {**{k: v for k, v in best.trainer_state().items() if k != "metrics"},
                                 "stopped_early": stopped_early}
    if device.type == "cuda":
        summary["peak_gib_per_gpu"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return summary


def _model(cfg: TrainConfig, label_names: list[str], size: int, device: torch.device, dims: ParallelDims, out: Path,
           say) -> tuple:
    """The HF ViT as it will train (LoRA, drop-path; not yet parallel) and its preprocessing."""
    torch.manual_seed(cfg.seed)  # every rank draws the same init (FSDP/TP do not broadcast it)
    model, pre = build_model(cfg.model, label_names, pretrained=cfg.pretrained, image_size=cfg.image_size,
                             patch_size=cfg.patch_size, dropout=cfg.dropout, device=init_device(device, cfg.plugin),
                             log=say)
    if size != pre.image_size:
        raise ConfigError(f"model {cfg.model} expects {pre.image_size}px inputs, not {size}px; "
                          f"use a model whose image_size is {size} or a local folder")
    model = apply_lora(model, cfg, say)
    check_lora_resume(cfg, out, model)
    _check_layout(cfg, model, dims)
    apply_drop_path(model, cfg.drop_path)
    return model, pre


def _on_gpu_if_small(split, device: torch.device):
    """The cached uint8 training images, moved to the GPU when they fit in a small slice of it."""
    if (isinstance(split, ImageSplit) and device.type == "cuda"
            and split.images.numel() < 0.1 * torch.cuda.mem_get_info(device)[0]):
        return ImageSplit(split.images.to(device), split.labels.to(device))
    return split


def _run_length(cfg: TrainConfig, train_images: int, dp: int) -> tuple[int, int, int]:
    """(global batch, optimizer steps per epoch, total steps); one error line when an epoch holds no step."""
    global_batch = cfg.batch_size * dp
    steps_per_epoch = num_batches(train_images, global_batch, drop_last=True) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the train split has {train_images} images, fewer than one step needs "
                          f"({global_batch * cfg.grad_accum} = batch_size*dp*grad_accum); lower --batch_size")
    total_steps = cfg.epochs * steps_per_epoch
    return global_batch, steps_per_epoch, min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps


def _eval_batches(cfg: TrainConfig, splits: dict, dp: int, total_steps: int) -> int:
    """Evaluation batches a data-parallel rank takes in the run: the validations, the final test."""
    def batches(split: str) -> int:
        return batches_per_rank(len(splits[split]), cfg.eval_batch_size, dp) if split in splits else 0
    validations = (cfg.epochs // cfg.eval_every if cfg.eval_every else 1) + (
        total_steps // cfg.eval_steps if cfg.eval_steps else 0)
    return batches("validation") * max(1, validations) + batches("test")


class SavePace:
    """--save_min_seconds: an epoch's checkpoint is skipped while the last checkpoint (or the start of
    training) is less than that many seconds ago. A fault then loses at most about that much, and a short
    run does not wait on checkpoints nobody resumes from (0.7-0.9 s of a 3-epoch ViT-B run's ~9 s on a
    GPU, BENCHMARKS.md section 28). Rank 0's clock decides, so every rank agrees."""

    def __init__(self, min_seconds: float):
        self.min_seconds, self.last, self.said = min_seconds, time.perf_counter(), False

    def saved(self) -> None:
        self.last = time.perf_counter()

    def too_soon(self, say) -> bool:
        """Collective (when on): whether to skip this epoch's checkpoint."""
        if self.min_seconds <= 0:
            return False
        skip = time.perf_counter() - self.last < self.min_seconds
        if dist.is_initialized() and dist.get_world_size() > 1:
            decision = [skip]
            dist.broadcast_object_list(decision, src=0)
            skip = decision[0]
        if skip and not self.said:
            say(f"checkpoint: epochs less than {self.min_seconds:g} s after the last checkpoint are not saved "
                "(--save_min_seconds; the run's last state always is)")
            self.said = True
        return skip


def _writer_busy(cfg: TrainConfig, step: int, say) -> bool:
    """Collective. Whether a per-epoch checkpoint is skipped: under --async_checkpoint without --save_every
    (then every checkpoint asked for is written), while the previous write still runs, rather than block
    training on it: a short run's epochs end faster than a write. The run's last checkpoint is never
    skipped, and the previous one stays until it is replaced."""
    if not cfg.async_checkpoint or cfg.save_every or not writing():
        return False
    say(f"checkpoint: step {step} skipped, the previous checkpoint is still being written")
    return True


def _unsharded(engine: Engine) -> bool:
    """Whether every rank holds the whole model as one module (one process, DDP, ZeRO-1), not pipeline
    stages, FSDP or tensor-parallel shards. Read from the plan: FSDP's registered parameters are plain
    tensors while unsharded after a forward (ZeRO-2 keeps them so)."""
    return engine.plan.data_parallel != "fsdp" and not engine.dims.tp_enabled and not engine.dims.pp_enabled


def _export(cfg: TrainConfig, engine: Engine, out: Path, final: Path, say) -> WriteError | None:
    """Rank 0 writes <output>/model (and the LoRA adapter): from the weights in memory when the model is
    one unsharded module, else rebuilt from the checkpoint the run ended with (any layout; a resumed run
    that saved nothing new: the newest that loads). A storage failure is returned, to raise after the summary."""
    adapter = out / "adapter" if cfg.lora_rank else None
    try:
        if _unsharded(engine):
            with engine.eval_weights():  # the EMA weights when --ema
                export_state(out, engine.model_state(), out / "model", adapter, final)
        else:
            export_checkpoint(final if final.is_dir() else out, out / "model", adapter)
    except WriteError as e:  # e.g. a full disk: the summary still keeps the results
        return e
    say(f"model exported to {out / 'model'}" + (f", LoRA adapter to {adapter}" if adapter else ""))
    return None


def _load_data(cfg: TrainConfig, size: int, is_main: bool, say) -> ImageDataset:
    """Rank 0 decodes and caches; the others wait and read the cache. Where rank 0 cannot (a missing folder,
    a bad image), it raises its error and the others end quietly (PeerFailed), not with the traceback of a
    collective whose peer has gone."""
    cache = Path(cfg.cache_dir).expanduser()
    failure = None
    if is_main:
        try:
            data = load_image_dataset(cfg.dataset, size, cache, skip_bad_images=cfg.skip_bad_images,
                                      stream=cfg.stream, log=say)
        except Exception as e:  # noqa: BLE001 (raised below, once every rank knows)
            failure = e
    if any_rank(failure is not None):
        raise failure or PeerFailed("rank 0 could not load the dataset")
    if not is_main:
        data = load_image_dataset(cfg.dataset, size, cache, skip_bad_images=cfg.skip_bad_images,
                                  stream=cfg.stream, log=lambda *_: None)
    if "train" not in data.splits:
        raise ConfigError(f"dataset {cfg.dataset} has no train split")
    if cfg.load_best_model_at_end and "validation" not in data.splits:
        raise ConfigError(f"--load_best_model_at_end picks the weights by their validation, and {cfg.dataset} has no "
                          f"validation split (it has {', '.join(data.splits)}); add one or drop the flag")
    return data


def _model_image_size(cfg: TrainConfig) -> int:
    from .model import NAMED_CONFIGS, read_preprocess, refuse_custom_code
    if cfg.model in NAMED_CONFIGS:
        size = cfg.image_size or NAMED_CONFIGS[cfg.model][5]
        check_patch_grid(size, cfg.patch_size or NAMED_CONFIGS[cfg.model][4])
        return size
    folder = Path(cfg.model).expanduser()
    if (folder / "config.json").is_file():
        refuse_custom_code(folder)  # before the data is decoded
        size = json.loads((folder / "config.json").read_text()).get("image_size", 224)
        return read_preprocess(folder, size).image_size
    return 224  # hub ids: every google/vit-*-224 model; build_model checks the real value


def _check_layout(cfg: TrainConfig, model, dims: ParallelDims) -> None:
    c = model.config
    if c.num_attention_heads % dims.tp:
        raise ConfigError(f"{c.num_attention_heads} attention heads are not divisible by --tp_size {dims.tp}; "
                          f"pick a tp_size that divides the head count")
    stages = dims.pp * (2 if cfg.pp_schedule == "Interleaved1F1B" else 1)
    if c.num_hidden_layers < stages:
        raise ConfigError(f"{c.num_hidden_layers} layers cannot fill {stages} pipeline stages; lower --pp_size")


MIN_LOSS_SCALE = 1.0  # DeepSpeed's min_loss_scale: 17 overflows in a row take GradScaler's 2**16 below it


def _check_diverged(scale: float | None, norm: float | None, step: int, ckpt_root: Path) -> None:
    """Stop a run whose weights no longer train, at a log row or before a checkpoint, so that no checkpoint
    of them rotates a good one out (--save_total_limit). fp16 skips each overflowing step and halves its
    loss scale: below MIN_LOSS_SCALE nothing has moved for many steps (GradScaler would skip on; DeepSpeed
    stops there too). bf16/fp32 skip nothing: a non-finite gradient norm means nan/inf went into the
    weights. The scale (None without fp16) and the norm (None before the first step) are global, so every
    rank stops at the same step."""
    if scale is not None:
        if scale >= MIN_LOSS_SCALE:
            return
        what = (f"the fp16 loss scale fell to {scale:g} by step {step}: the loss or its gradients overflowed "
                f"fp16's range step after step, and each such step is skipped")
        fix = "train with --mixed_precision bf16 (as fast on GPUs that have it) or fp32"
    else:
        if norm is None or math.isfinite(norm):
            return
        what = f"training diverged: the gradient norm is {norm} at step {step}, so the weights are no longer finite"
        fix = "lower --lr or raise --warmup_ratio, then start again"
    last = latest_checkpoint(ckpt_root)
    saved = f"the last checkpoint, {last}, was saved before it" if last else "no checkpoint was saved before it"
    raise ConfigError(f"{what}; {saved}; {fix}")


def _dp_mean(t: torch.Tensor, group) -> float:
    if group is not None:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG if t.device.type == "cuda" else dist.ReduceOp.SUM, group=group)
        if t.device.type != "cuda":
            t /= dist.get_world_size(group)
    return float(t)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run(cfg: TrainConfig, launched: float | None = None, launch_marks: dict[str, float] | None = None) -> dict:
    """Entry point used by the CLI: tear the process group down whatever happens."""
    try:
        return train(cfg, launched, launch_marks)
    finally:
        restore_signals()
        close_checkpoints()
        if dist.is_initialized():
            dist.destroy_process_group()
