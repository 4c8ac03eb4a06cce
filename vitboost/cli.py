"""`vitboost` command line: train, eval, predict, export, bench.

Flag names follow timm / HF Trainer (--model --dataset -b --lr --epochs --output); the
ColossalAI ViT example's spellings work as aliases. Bad input ends in one line on stderr
and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from .config import (COMPILE_MODES, DEFAULT_PEAK_TFLOPS, LR_SCHEDULES, PLUGINS, PP_SCHEDULES, PRECISIONS, ConfigError,
                     make_config)

BOOL = argparse.BooleanOptionalAction


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--config", help="YAML file of options; flags given here override it")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", "--model_name_or_path", dest="model",
                   help="hub id (google/vit-base-patch16-224), local HF folder, or named config "
                        "(vit-micro, vit-tiny, vit-small, vit-base, vit-large, vit-huge, vit-giant)")
    g.add_argument("--pretrained", choices=("auto", "true", "none"), help="auto: load weights when --model has them")
    g.add_argument("--dataset", "--dataset_name", dest="dataset",
                   help="hub id (beans), imagefolder dir (data/beans), parquet file or dir")
    g.add_argument("--image_size", "--img_size", dest="image_size", type=int)
    g.add_argument("--patch_size", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--drop_path", type=float, help="stochastic depth rate of the last block (timm's drop_path_rate)")
    g.add_argument("--lora_rank", type=int, help="train LoRA adapters of this rank through peft (0: full fine-tuning)")
    g.add_argument("--lora_alpha", type=float, help="LoRA scaling numerator (default: the rank)")
    g.add_argument("--lora_dropout", type=float)
    g.add_argument("--lora_targets", help="comma-separated module names (default: the attention and MLP linears)")
    g.add_argument("--cache_dir")
    g.add_argument("--skip_bad_images", action=BOOL, default=None)
    g.add_argument("--stream", action=BOOL, default=None,
                   help="decode batch by batch instead of caching (automatic when the cache would exceed half the RAM)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", "--num_epoch", "--num_train_epochs", dest="epochs", type=int)
    g.add_argument("--max_steps", type=int)
    g.add_argument("-b", "--batch_size", "--per_device_train_batch_size", dest="batch_size", type=int,
                   help="per data-parallel rank")
    g.add_argument("--grad_accum", "--gradient_accumulation_steps", "--grad_accum_steps", dest="grad_accum", type=int)
    g.add_argument("--lr", "--learning_rate", dest="lr", type=float, help="peak learning rate (not scaled by world size)")
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--warmup_ratio", type=float, help="warmup as a fraction of the run's steps (default 0.3)")
    g.add_argument("--warmup_steps", type=int, help="warmup in steps; when > 0 it replaces --warmup_ratio")
    g.add_argument("--lr_scheduler_type", choices=LR_SCHEDULES,
                   help="after warmup: cosine (default) or linear decay to 0, constant_with_warmup; constant: no warmup")
    g.add_argument("--max_grad_norm", "--clip_grad", dest="max_grad_norm", type=float)
    g.add_argument("--adam_beta1", type=float, help="AdamW's beta1 (default 0.9)")
    g.add_argument("--adam_beta2", type=float, help="AdamW's beta2 (default 0.999)")
    g.add_argument("--adam_epsilon", type=float, help="AdamW's epsilon (default 1e-8)")
    g.add_argument("--layer_decay", type=float, help="layer-wise lr decay, e.g. 0.65: block i of L gets lr * "
                   "decay^(L-i), the embeddings decay^(L+1), the head the full lr (BEiT/MAE fine-tuning)")
    g.add_argument("--ema", "--model_ema_decay", dest="ema", type=float,
                   help="weight EMA decay per step, e.g. 0.998 (evaluated and exported); 0: off")
    g.add_argument("--seed", type=int)
    g.add_argument("--distillation_type", choices=("none", "hard", "soft"),
                   help="learn from a convnet teacher's predictions too (DeiT): hard = its argmax")
    g.add_argument("--distillation_alpha", type=float, help="weight of the teacher's targets (default 0.5)")
    g.add_argument("--teacher_model", help="named convnet trained first in this run (resnet-tiny, resnet-small, "
                   "resnet-18) or an HF image-classifier folder")
    g.add_argument("--teacher_epochs", type=int, help="epochs for a named teacher (default 100)")
    g.add_argument("--augment", choices=("none", "light", "strong"))
    g.add_argument("--mixup", type=float)
    g.add_argument("--cutmix", type=float)
    g.add_argument("--label_smoothing", "--smoothing", "--label_smoothing_factor", dest="label_smoothing", type=float)
    g = p.add_argument_group("strategy")
    g.add_argument("--plugin", choices=PLUGINS)
    g.add_argument("--zero_stage", type=int, choices=(1, 2))
    g.add_argument("--tp_size", type=int)
    g.add_argument("--pp_size", type=int)
    g.add_argument("--microbatch_size", type=int)
    g.add_argument("--pp_schedule", choices=PP_SCHEDULES)
    g.add_argument("--mixed_precision", choices=PRECISIONS)
    for precision in ("bf16", "fp16"):  # HF Trainer's switches
        g.add_argument(f"--{precision}", dest="mixed_precision", action="store_const", const=precision,
                       help=f"= --mixed_precision {precision}")
    g.add_argument("--grad_checkpoint", "--gradient_checkpointing", dest="grad_checkpoint", nargs="?", const=True,
                   type=_bool, default=None,
                   help="activation checkpointing per block (ColossalAI's `--grad_checkpoint True` works too)")
    g.add_argument("--compile", nargs="?", const="true", choices=COMPILE_MODES,
                   help="torch.compile the model (default auto: when the run is long enough to pay it back; true = "
                        "blocks: each block, one graph they share; model: the whole model as one graph)")
    g.add_argument("--no-compile", dest="compile", action="store_const", const="false", help=argparse.SUPPRESS)
    g.add_argument("--torch_compile", dest="compile", action="store_const", const="true", help=argparse.SUPPRESS)
    g.add_argument("--cuda_graph", nargs="?", const="true", choices=("auto", "true", "false"),
                   help="capture the whole step as one CUDA graph (default auto: wherever the step allows)")
    g.add_argument("--no-cuda_graph", dest="cuda_graph", action="store_const", const="false", help=argparse.SUPPRESS)
    g.add_argument("--tf32", action=BOOL, default=None, help="fp32 matmuls on TF32 tensor cores (default on)")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"))
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval_batch_size", "--per_device_eval_batch_size", "--validation_batch_size",
                   dest="eval_batch_size", type=int)
    g.add_argument("--log_every", "--logging_steps", dest="log_every", type=int)
    g.add_argument("--save_every", "--save_steps", dest="save_every", type=int, help="checkpoint every N optimizer steps")
    g.add_argument("--save_epochs", type=int, help="checkpoint every N epochs (default 1)")
    g.add_argument("--save_min_seconds", type=float,
                   help="skip an epoch's checkpoint until this many seconds have passed since the last one "
                        "(default 60: a short run writes only its last state; 0: every --save_epochs)")
    g.add_argument("--eval_every", type=int, help="validate every N epochs (0: only at the end)")
    g.add_argument("--eval_steps", type=int, help="also validate every N optimizer steps (HF Trainer's; 0: off); "
                   "a step that ends an epoch with a validation due is validated once")
    g.add_argument("--load_best_model_at_end", action=BOOL, default=None,
                   help="test and export the weights of the best validation, not the last (HF Trainer's option)")
    g.add_argument("--metric_for_best_model", help="loss (default, lower is better) or accuracy")
    g.add_argument("--early_stopping_patience", type=int,
                   help="with --load_best_model_at_end: stop after N validations without a better one (0: off)")
    g.add_argument("--keep_checkpoints", "--save_total_limit", dest="keep_checkpoints", type=int)
    g.add_argument("--async_checkpoint", action=BOOL, default=None,
                   help="write checkpoints in the background while training goes on (default: on)")
    g.add_argument("--output", "--output_path", "--output_dir", dest="output")
    g.add_argument("--resume", "--resume_from_checkpoint", dest="resume",
                   help="auto (latest in --output) or a checkpoint folder")
    g.add_argument("--overwrite", action=BOOL, default=None)
    g.add_argument("--plot", action=BOOL, default=None)
    g.add_argument("--report_to", nargs="+", help="also log to: tensorboard (under <output>/tb) or none (default)")
    g.add_argument("--export", action=BOOL, default=None)
    g.add_argument("--progress", action=BOOL, default=None)


class _Parser(argparse.ArgumentParser):
    """A misspelt flag or value is one ``error:`` line naming it and where the choices are (exit 2),
    as every other bad input, instead of argparse's usage block (30 lines for train) above it.
    Every flag also takes hyphens for its underscores (timm's ``--drop-path``, ``--no-async-checkpoint``),
    as HF's argument parser does."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._spelled(a) for a in args], namespace)

    def _spelled(self, token: str) -> str:
        """``--foo-bar[=v]`` as the ``--foo_bar[=v]`` this parser knows (``--no-foo-bar``: ``--no-foo_bar``);
        anything else as given, so an unknown flag is still reported as typed."""
        flag, eq, value = token.partition("=")
        if not flag.startswith("--") or flag in self._option_string_actions:
            return token
        negated = flag.startswith("--no-")
        for known in ("--" + flag[2:].replace("-", "_"), "--no-" + flag[5:].replace("-", "_") if negated else ""):
            if known in self._option_string_actions:
                return known + eq + value
        return token


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    """Same spellings as `vitboost train` for everything that shapes the training step (bench.py runs it)."""
    a = p.add_argument
    a("--model", default="vit-base", help="named config (vit-micro ... vit-giant), HF folder or hub id; "
                                          "always random init (weights do not change the speed)")
    a("--image_size", type=int)
    a("--patch_size", type=int)
    a("--num_labels", type=int, default=1000, help="classifier width (ImageNet-1k by default)")
    a("-b", "--batch_size", type=int, help="per data-parallel rank (default: train's 16)")
    a("--plugin", choices=PLUGINS)
    a("--zero_stage", type=int, choices=(1, 2))
    a("--tp_size", type=int)
    a("--pp_size", type=int)
    a("--microbatch_size", type=int)
    a("--pp_schedule", choices=PP_SCHEDULES)
    a("--mixed_precision", choices=PRECISIONS)
    a("--compile", nargs="?", const="true", choices=COMPILE_MODES,
      help="torch.compile (default auto: on, as for a long training run)")
    a("--grad_checkpoint", action=BOOL, default=None)
    a("--device", choices=("auto", "cuda", "cpu"))
    a("--seed", type=int)
    a("--lora_rank", type=int, help="LoRA adapters of this rank through peft (0: full fine-tuning)")
    a("--lora_alpha", type=float)
    a("--lora_targets", help="comma-separated module names (default: the attention and MLP linears)")
    a("--steps", type=int, default=20, help="timed steps")
    a("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, NCCL setup)")
    a("--peers", nargs="*", metavar="PEER", help="also time what users try instead (single process only): "
      "hf_eager, hf_compile, timm_compile, timm_cudagraph; no names: all of them")
    a("--cuda_graph", choices=("auto", "true", "false"), help="the whole step as one CUDA graph (default auto)")
    a("--no-compile", dest="compile", action="store_const", const="false", help=argparse.SUPPRESS)
    a("--tf32", action=BOOL, default=None, help="fp32 matmuls on TF32 tensor cores (default on)")
    a("--peak_tflops", type=float, help=f"peak FLOP/s per device for MFU (default {DEFAULT_PEAK_TFLOPS:g} "
                                        "on CUDA: H100/H200 bf16 dense; none on CPU, so mfu is null)")
    a("--json", help="write the rows as a JSON list to this file")
    a("--csv", help="append the rows to this CSV file (header written when new)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitboost", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="fine-tune a ViT (launch with torchrun for several GPUs)"))

    p = sub.add_parser("eval", help="evaluate a trained model folder on a dataset split")
    p.add_argument("--model", required=True, help="HF folder (e.g. runs/latest/model) or hub id")
    p.add_argument("--dataset", default="data/beans")
    p.add_argument("--split", default="all", help="validation, test, train or all")
    p.add_argument("-b", "--batch_size", type=int, default=64)
    p.add_argument("--cache_dir", default="~/.cache/vitboost")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = sub.add_parser("predict", help="top-k labels for images")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True)
    p.add_argument("--top_k", type=int, default=3)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="write a checkpoint as an HF save_pretrained folder (safetensors)")
    p.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint) or a step_* folder")
    p.add_argument("--output", required=True)
    p.add_argument("--adapter", help="a LoRA run: also write the adapter alone (peft format) to this folder")

    _add_bench_args(sub.add_parser("bench", help="throughput / memory / MFU on synthetic data"))
    sub.add_parser("launch", help="torchrun that keeps bytecode where an image forbids writing it: "
                                  "vitboost launch [torchrun options] train ...", add_help=False)
    return parser


def _train(args: argparse.Namespace, launched: float, marks: dict[str, float]) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    cfg = make_config(overrides, args.config)
    from .train import run
    run(cfg, launched, marks)
    return 0


def process_start(marks: dict[str, float] | None = None) -> float:
    """When the user's wait began, on time.perf_counter's clock: this process's start, from /proc (Linux),
    so the interpreter's own start-up counts; in a torchrun rank (vitboost launch's too), its launcher's
    start, so the launcher's imports and rendezvous count (1.8-3.5 s on an H200 host, BENCHMARKS.md section
    32), and marks["rank_started"] says when the rank itself started. Elsewhere, when the vitboost package
    was first imported."""
    from . import IMPORTED
    own = _started("self") or IMPORTED
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun's agent, this process's parent
        launcher = _started(str(os.getppid()))
        if launcher is not None and launcher <= own:
            if marks is not None:
                marks["rank_started"] = own
            return launcher
    return own


def _started(pid: str) -> float | None:
    """When process pid ("self", or a number) started, on time.perf_counter's clock; None where /proc cannot say."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.perf_counter() - age if age >= 0 else None


def _eval(args: argparse.Namespace) -> int:
    from .predict import evaluate_folder
    results = evaluate_folder(args.model, args.dataset, args.split, batch_size=args.batch_size,
                              cache_dir=args.cache_dir, device=args.device)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for split, m in results.items():
            print(f"eval accuracy: {m['accuracy']:.4f} ({split}, {m['num_samples']} images), loss {m['loss']:.4f}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .data import require_image_files
    from .predict import Predictor
    require_image_files(args.images)
    rows = Predictor(args.model, device=args.device).predict(args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(row["image"] + ": " + ", ".join(f"{p['label']} {p['score']:.3f}" for p in row["predictions"]))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint
    out = export_checkpoint(Path(args.checkpoint), Path(args.output), Path(args.adapter) if args.adapter else None)
    print(f"exported {out}" + (f" and the LoRA adapter to {args.adapter}" if args.adapter else ""))
    return 0


def _may_use_gpu(args: argparse.Namespace) -> bool:
    """Whether a train command may run on a GPU: its --device, else its config file's (read leniently
    here: make_config checks the file later and reports what is wrong with it)."""
    device = args.device
    if device is None and args.config:
        try:
            import yaml
            device = (yaml.safe_load(Path(args.config).read_text()) or {}).get("device")
        except Exception:  # noqa: BLE001 (a bad file is reported by make_config)
            device = None
    return device != "cpu"


def _start_cuda(marks: dict[str, float]) -> threading.Thread:
    """Start CUDA (driver and this rank's context, ~0.4 s) in a thread while transformers is imported
    (3-4 s of Python that does not wait for it): 0.3-0.5 s off a GPU run's launch (BENCHMARKS.md
    section 22). Any failure is left to the main thread, which starts CUDA itself and says what is wrong.
    marks["cuda_ready"]: when the context was up (summary.json's launch_marks_s)."""
    def start() -> None:
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # the rank's own GPU, not GPU 0
                torch.empty(1, device="cuda")
                marks["cuda_ready"] = time.perf_counter()
        except Exception:  # noqa: BLE001 (reported by the main thread's own start)
            pass
    thread = threading.Thread(target=start, name="vitboost-cuda-start", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    """argv None: the command line of this process, whose start the launch phase counts from;
    a list (an in-process call): the launch phase counts from this call."""
    code = _main(argv)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave(code)
    return code


def _leave(code: int) -> NoReturn:
    """End a torchrun rank whose command has returned (its run finished, or stopped with its checkpoint
    written, or failed with its one line printed) without the interpreter's teardown. gloo's worker
    threads outlive ``destroy_process_group()``, and one that frees a finished collective's tensors while
    the interpreter finalizes aborts the process ("terminate called without an active exception"),
    turning a finished run into a failed one for torchrun (BENCHMARKS.md section 25). Everything this
    process writes is closed or flushed by now; Inductor's compile workers exit when their parent does."""
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    marks = {"cli_started": time.perf_counter()}  # the launch phase's parts, for summary.json
    launched = process_start(marks) if argv is None else time.perf_counter()
    if argv is None:
        from . import IMPORTED
        from .bytecode import keep_bytecode
        marks["vitboost_imported"] = IMPORTED
        # where an image forbids Python to write bytecode (bytecode.py); before anything loads torch (the
        # parser does, for bench's flags)
        keep_bytecode(compile_ahead=os.environ.get("LOCAL_RANK", "0") == "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["launch"]:  # torchrun's options, then a command: not for this parser (launch.py)
        from .launch import LaunchError, launch
        try:
            return launch(words[1:])
        except LaunchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad flag: its one line is printed
        return e.code if isinstance(e.code, int) else 2
    from .data import DataError
    from .model import ModelError
    from .parallel.dims import LayoutError, PeerFailed, world_info
    from .preempt import Preempted
    from .storage import CheckpointError, WriteError, describe_os_error
    handlers = {"eval": _eval, "predict": _predict, "export": _export}
    if argv is None and args.command in ("train", "eval", "predict", "export"):
        from .model import import_transformers_lean
        cuda = _start_cuda(marks) if args.command == "train" and _may_use_gpu(args) else None
        import_transformers_lean()  # this process runs vitboost alone: skip transformers' unused extras
        marks["transformers_imported"] = time.perf_counter()
        if cuda is not None:
            cuda.join()
        from .bytecode import torchrun_note, uncached_bytecode
        note = uncached_bytecode() or torchrun_note()
        if note and world_info()[0] == 0:
            print(note, file=sys.stderr, flush=True)
    try:
        if args.command == "bench":
            from .bench import run_bench
            return run_bench(args)
        if args.command == "train":
            return _train(args, launched, marks)
        return handlers[args.command](args)
    except (ConfigError, DataError, ModelError, LayoutError, CheckpointError, WriteError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PeerFailed:  # the rank that failed said why
        return 2
    except OSError as e:  # a path that cannot be created or written (ENOSPC, EROFS, EACCES, ENOTDIR ...)
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM/SIGUSR1: the checkpoint is written; say how to continue
        if str(e):
            print(e, file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
