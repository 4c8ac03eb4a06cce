"""The run configuration: one dataclass, defaults visible, YAML in, YAML out.

Precedence is defaults < ``--config run.yaml`` < command-line flags. The resolved
config is written next to the run's outputs so every number can be reproduced.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PLUGINS = ("torch_ddp", "torch_ddp_fp16", "low_level_zero", "gemini", "hybrid_parallel", "fsdp", "auto")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B")
LR_SCHEDULES = ("cosine", "linear", "constant_with_warmup", "constant")  # HF Trainer's --lr_scheduler_type names
BEST_METRICS = ("loss", "accuracy")  # --metric_for_best_model: validation loss (lower is better), accuracy
AUTO_MODES = ("auto", "true", "false")  # --compile / --cuda_graph: auto picks what pays and says why
# --compile true = blocks: each block compiled, one graph they all share; model: the whole model as one
# graph (one module only; 4% faster on vit-tiny, 4-8x the compile time: BENCHMARKS.md section 21)
COMPILE_MODES = (*AUTO_MODES, "model", "blocks")
DEFAULT_PEAK_TFLOPS = 989.0  # `vitboost bench`'s MFU on CUDA: H100 / H200 SXM, bf16 dense tensor cores


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the fix."""


@dataclass
class TrainConfig:
    # what to train
    model: str = "google/vit-base-patch16-224"  # hub id, local HF folder, or a named config (vit-tiny ...)
    pretrained: str = "auto"  # auto: load weights for hub ids / folders; none: random init from the config
    dataset: str = "beans"  # hub id, imagefolder dir, parquet file/dir
    image_size: int | None = None  # override the model's input size (named configs only)
    patch_size: int | None = None  # override the patch size (named configs only)
    dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth of the last block (rising linearly from 0), as timm/DeiT
    # LoRA through peft (0: full fine-tuning): adapters on the block linears, the new head fully trained
    lora_rank: int = 0
    lora_alpha: float | None = None  # default: the rank (scaling 1)
    lora_dropout: float | None = None  # default: 0
    lora_targets: list[str] | None = None  # module-name suffixes; default: the attention and MLP linears
    # optimisation (batch_size is per data-parallel rank, as in the ColossalAI example)
    epochs: int = 3
    max_steps: int | None = None  # stop after this many optimizer steps (benchmarks, smoke tests)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_ratio: float = 0.3
    warmup_steps: int = 0  # when > 0, the warmup in steps, in place of warmup_ratio (as HF Trainer)
    lr_scheduler_type: str = "cosine"  # after warmup: cosine | linear (decay to 0) | constant_with_warmup | constant
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9  # AdamW's betas and epsilon (HF Trainer's names and defaults)
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    layer_decay: float | None = None  # layer-wise lr decay (BEiT/MAE fine-tuning, timm's --layer-decay), e.g. 0.65
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); evaluated and exported
    # distillation (DeiT, class token only): a teacher's predictions join the labels as the student's targets
    distillation_type: str = "none"  # none | hard (the teacher's argmax, DeiT's best) | soft (its probabilities)
    distillation_alpha: float = 0.5  # weight of the teacher's targets
    teacher_model: str = "resnet-small"  # a named convnet trained first in this run, or an HF classifier folder
    teacher_epochs: int = 100  # for a named teacher
    seed: int = 42
    # augmentation (vitboost.augment presets: none, light, strong) and overrides
    augment: str = "none"
    mixup: float | None = None
    cutmix: float | None = None
    label_smoothing: float | None = None
    # strategy
    plugin: str = "torch_ddp"
    zero_stage: int = 1
    tp_size: int = 1
    pp_size: int = 1
    microbatch_size: int | None = None  # pipeline microbatch; default: batch_size // (2 * pp_size)
    pp_schedule: str = "1F1B"
    mixed_precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    grad_checkpoint: bool = False
    compile: str = "auto"  # torch.compile the model: auto = when the run is long enough to pay for it
    cuda_graph: str = "auto"  # the whole step as one CUDA graph: auto = wherever the step allows it
    tf32: bool = True  # fp32 matmuls on TF32 tensor cores (as HF Trainer's --tf32); no effect on CPU
    device: str = "auto"
    # evaluation, logging, checkpoints
    eval_batch_size: int = 64
    eval_every: int = 1  # validate every N epochs (0: only at the end)
    eval_steps: int = 0  # also validate every N optimizer steps (HF Trainer's eval_steps; 0: off)
    load_best_model_at_end: bool = False  # test and export the weights of the best validation (HF Trainer's option)
    metric_for_best_model: str = "loss"  # loss (lower is better) or accuracy; HF Trainer's default is loss
    early_stopping_patience: int = 0  # stop after N validations without a better one (HF's EarlyStoppingCallback)
    log_every: int = 10
    save_every: int = 0  # also checkpoint every N optimizer steps
    save_epochs: int = 1  # checkpoint every N epochs (the last state is always saved)
    # ...once at least this many seconds have passed since the last checkpoint (or the start): a short run
    # writes only its last state (HF Trainer / torchtitan save every 500 steps); 0: every --save_epochs
    save_min_seconds: float = 60.0
    keep_checkpoints: int = 2
    async_checkpoint: bool = True  # write checkpoints in a background thread while training goes on
    output: str = "runs/latest"
    resume: str | None = None  # "auto" or a checkpoint folder
    overwrite: bool = False
    cache_dir: str = "~/.cache/vitboost"
    skip_bad_images: bool = False
    stream: bool = False  # decode batch by batch instead of caching (automatic when the cache would not fit)
    plot: bool = False
    report_to: list[str] = field(default_factory=lambda: ["none"])  # also log to: tensorboard (<output>/tb)
    export: bool = True  # write an HF save_pretrained folder to <output>/model at the end
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into the summary

    def validate(self) -> None:
        if self.plugin not in PLUGINS:
            raise ConfigError(f"unknown --plugin {self.plugin!r}; choose one of {', '.join(PLUGINS)}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"unknown --mixed_precision {self.mixed_precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"unknown --pp_schedule {self.pp_schedule!r}; choose one of {', '.join(PP_SCHEDULES)}")
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"--zero_stage must be 1 or 2 (use --plugin fsdp for stage 3), got {self.zero_stage}")
        if (self.tp_size > 1 or self.pp_size > 1) and self.plugin not in ("hybrid_parallel", "auto"):
            raise ConfigError(f"--tp_size/--pp_size need --plugin hybrid_parallel (got --plugin {self.plugin})")
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "tp_size", "pp_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer_decay must be in (0, 1] (e.g. 0.65; 1 or unset: one lr for every layer), "
                              f"got {self.layer_decay}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"--ema must be in [0, 1) (a decay such as 0.998; 0 turns it off), got {self.ema}")
        if self.distillation_type not in ("none", "hard", "soft"):
            raise ConfigError(f"unknown --distillation_type {self.distillation_type!r}; choose none, hard or soft")
        if not 0 < self.distillation_alpha <= 1:
            raise ConfigError(f"--distillation_alpha must be in (0, 1], got {self.distillation_alpha}")
        if self.teacher_epochs < 1:
            raise ConfigError(f"--teacher_epochs must be >= 1, got {self.teacher_epochs}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"--drop_path must be in [0, 1), got {self.drop_path}")
        for name in ("mixup", "cutmix", "weight_decay", "max_grad_norm", "dropout"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= (self.label_smoothing or 0) < 1:
            raise ConfigError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.augment not in ("none", "light", "strong"):
            raise ConfigError(f"unknown --augment {self.augment!r}; choose none, light or strong")
        for name, modes in (("compile", COMPILE_MODES), ("cuda_graph", AUTO_MODES)):
            value = getattr(self, name)
            if isinstance(value, bool) or value in (None, 0, 1):  # YAML `compile: true`
                value = "true" if value else "false"
            if str(value).lower() not in modes:
                raise ConfigError(f"--{name} must be {', '.join(modes[:-1])} or {modes[-1]}, got {value!r}")
            setattr(self, name, str(value).lower())
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup_steps must be >= 0 (0: use --warmup_ratio), got {self.warmup_steps}")
        metric = str(self.metric_for_best_model).removeprefix("eval_")  # HF Trainer also writes eval_accuracy
        if metric not in BEST_METRICS:
            raise ConfigError(f"unknown --metric_for_best_model {self.metric_for_best_model!r}; choose "
                              f"{' or '.join(BEST_METRICS)}")
        self.metric_for_best_model = metric
        if self.load_best_model_at_end and not (0 < self.eval_every <= self.epochs or self.eval_steps > 0):
            raise ConfigError(f"--load_best_model_at_end picks among the validations during training, and "
                              f"--eval_every {self.eval_every} with --epochs {self.epochs} runs none; "
                              f"set --eval_every N (validate every N epochs, N <= --epochs) or --eval_steps N")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_epsilon > 0:
            raise ConfigError(f"--adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"--early_stopping_patience must be >= 0 (0: off), got {self.early_stopping_patience}")
        if self.early_stopping_patience and not self.load_best_model_at_end:
            raise ConfigError("--early_stopping_patience stops when the best validation is that many validations "
                              "old, and tests and exports that best: add --load_best_model_at_end (as HF Trainer)")
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ConfigError(f"unknown --lr_scheduler_type {self.lr_scheduler_type!r}; choose one of "
                              f"{', '.join(LR_SCHEDULES)}")
        for name in ("max_steps", "save_every", "eval_every", "eval_steps", "keep_checkpoints", "save_min_seconds"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"--{name} must be >= 0 (0: {_ZERO[name]}), got {getattr(self, name)}")
        if self.save_epochs < 1:
            raise ConfigError(f"--save_epochs must be >= 1, got {self.save_epochs}")
        for name in ("image_size", "patch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size and self.patch_size:
            check_patch_grid(self.image_size, self.patch_size)
        self._validate_lora()
        from .report import check_available, normalize_report_to
        self.report_to = normalize_report_to(self.report_to)
        if problem := check_available(self.report_to):
            raise ConfigError(problem)

    def _validate_lora(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if self.lora_rank < 0:
            raise ConfigError(f"--lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if not self.lora_rank:
            given = [n for n in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(self, n) is not None]
            if given:
                raise ConfigError(f"--{given[0]} needs --lora_rank R (> 0) to train LoRA adapters")
            return
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= (self.lora_dropout or 0) < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None and not self.lora_targets:
            raise ConfigError("--lora_targets is empty; pass module names such as q_proj,v_proj or leave it out")
        if self.tp_size > 1:
            raise ConfigError("--lora_rank does not combine with --tp_size > 1 (the tensor-parallel plan shards the "
                              "nn.Linear layers LoRA wraps); use --plugin fsdp, or --pp_size for a pipeline")
        import importlib.util
        if importlib.util.find_spec("peft") is None:
            raise ConfigError("--lora_rank needs the peft package; pip install peft (or 'vitboost[lora]')")

    def warmup(self, total_steps: int) -> int:
        """Warmup steps: --warmup_steps when set, else --warmup_ratio of the run (HF Trainer's rule)."""
        return self.warmup_steps or int(total_steps * self.warmup_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_ZERO = {"max_steps": "no limit", "save_every": "only at epoch ends", "eval_every": "only at the end",
         "eval_steps": "off", "keep_checkpoints": "keep all", "save_min_seconds": "every --save_epochs"}


def check_patch_grid(image_size: int, patch_size: int) -> None:
    """A ViT cuts the image into whole patches: the size must be a multiple of the patch."""
    if patch_size > image_size:
        raise ConfigError(f"--patch_size {patch_size} is larger than the image ({image_size}px); "
                          f"pick a patch size that divides the image size")
    if image_size % patch_size:
        lower = image_size // patch_size * patch_size
        raise ConfigError(f"--image_size {image_size} is not a multiple of --patch_size {patch_size}; "
                          f"use {lower} or {lower + patch_size}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run YAML; unknown keys are an error (typos must not be silently ignored)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing YAML to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}; fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of option: value")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ConfigError(f"config file {p} has unknown option(s) {', '.join(unknown)}; see `vitboost train --help`")
    return data


def make_config(overrides: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """defaults < YAML file < explicit overrides (None values mean 'not given')."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_yaml(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
