"""Flag names users know; the ColossalAI example's, HF Trainer's and timm's spellings are aliases of ours."""
from __future__ import annotations

import pytest

from vitboost.cli import build_parser


def test_colossalai_spellings_are_aliases():
    theirs = build_parser().parse_args(
        ["train", "--model_name_or_path", "m", "--learning_rate", "1e-3", "--num_epoch", "2",
         "--output_path", "out", "--grad_checkpoint", "True", "--batch_size", "16"])
    ours = build_parser().parse_args(
        ["train", "--model", "m", "--lr", "1e-3", "--epochs", "2", "--output", "out", "--grad_checkpoint", "-b", "16"])
    assert vars(theirs) == vars(ours)
    assert build_parser().parse_args(["train", "--grad_checkpoint", "false"]).grad_checkpoint is False


def test_hf_trainer_spellings_are_aliases():
    theirs = build_parser().parse_args(
        ["train", "--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "4",
         "--per_device_eval_batch_size", "32", "--logging_steps", "5", "--save_steps", "100", "--save_total_limit", "3",
         "--output_dir", "out", "--gradient_checkpointing", "--learning_rate", "1e-3", "--lr_scheduler_type", "linear",
         "--warmup_steps", "10", "--bf16", "--resume_from_checkpoint", "out/checkpoints/step_00000010"])
    ours = build_parser().parse_args(
        ["train", "--epochs", "2", "-b", "16", "--grad_accum", "4", "--eval_batch_size", "32", "--log_every", "5",
         "--save_every", "100", "--keep_checkpoints", "3", "--output", "out", "--grad_checkpoint", "--lr", "1e-3",
         "--lr_scheduler_type", "linear", "--warmup_steps", "10", "--mixed_precision", "bf16",
         "--resume", "out/checkpoints/step_00000010"])
    assert vars(theirs) == vars(ours)
    assert build_parser().parse_args(["train", "--fp16"]).mixed_precision == "fp16"


def test_timm_spellings_and_hyphens_are_aliases():
    theirs = build_parser().parse_args(
        ["train", "--batch-size", "16", "--drop-path", "0.1", "--weight-decay", "0.05", "--smoothing", "0.1",
         "--clip-grad", "1.0", "--grad-accum-steps", "2", "--img-size", "160", "--model-ema-decay", "0.998",
         "--layer-decay", "0.65", "--validation-batch-size", "64", "--no-async-checkpoint",
         "--lr-scheduler-type=linear"])
    ours = build_parser().parse_args(
        ["train", "-b", "16", "--drop_path", "0.1", "--weight_decay", "0.05", "--label_smoothing", "0.1",
         "--max_grad_norm", "1.0", "--grad_accum", "2", "--image_size", "160", "--ema", "0.998",
         "--layer_decay", "0.65", "--eval_batch_size", "64", "--no-async_checkpoint", "--lr_scheduler_type", "linear"])
    assert vars(theirs) == vars(ours)
    hf = build_parser().parse_args(["train", "--per-device-train-batch-size", "8", "--label_smoothing_factor", "0.1",
                                    "--dataset_name", "beans", "--torch_compile"])
    assert (hf.batch_size, hf.label_smoothing, hf.dataset, hf.compile) == (8, 0.1, "beans", "true")


def test_a_misspelt_flag_is_named_as_typed(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--batch-sise", "16"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--batch-sise" in err and "\n" not in err, err


def test_flags_not_given_stay_unset_so_the_yaml_file_can_supply_them():
    args = vars(build_parser().parse_args(["train"]))
    assert all(v is None for k, v in args.items() if k != "command")
