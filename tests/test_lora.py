"""LoRA through peft: adapters and the new head train, the base stays frozen, runs resume bitwise,
export merges into a plain HF model, and every data-parallel strategy and the pipeline agree with
one process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import train_args
from tests.distributed import run_distributed
from tests.test_cli_errors import fails_with
from tests.test_strategies import assert_same, base
from vitboost.cli import main

pytest.importorskip("peft")
LORA = ("--lora_rank", "4")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")  # transformers 5.x ViT block linears


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 'pretrained' micro ViT folder with a 10-class head (the dataset has 3)."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pretrained")
    ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, image_size=32, patch_size=8,
                                        num_labels=10)).save_pretrained(folder)
    return folder


def test_lora_trains_adapters_and_head_only_and_exports_merged_weights(tiny_beans, pretrained, tmp_path, capsys):
    from peft import PeftModel
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import ViTForImageClassification, pipeline
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--model", str(pretrained), *LORA, "--lr", "1e-2")) == 0
    assert "lora: rank 4" in capsys.readouterr().out

    # the optimizer saw only the adapters and the head: no Adam state for anything else
    meta = FileSystemReader(str(out / "checkpoints" / "step_00000006")).read_metadata().state_dict_metadata
    optimized = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in meta if k.startswith("optim.state.")}
    assert optimized and all(".lora_" in k or ".modules_to_save." in k for k in optimized), optimized
    assert any(k.startswith("classifier.modules_to_save") for k in optimized)

    # merged export: a plain HF model; frozen weights exactly the pretrained ones, adapted linears moved
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k
                   for k in load_file(out / "model" / "model.safetensors"))
    merged = ViTForImageClassification.from_pretrained(out / "model").state_dict()
    before = ViTForImageClassification.from_pretrained(pretrained).state_dict()
    assert merged.keys() == before.keys() and merged["classifier.weight"].shape == (3, 64)
    for k in merged:
        adapted = any(f".{t}." in k for t in TARGETS) and k.endswith("weight")
        if adapted:
            assert not torch.equal(merged[k], before[k]), k
        elif not k.startswith("classifier"):
            assert torch.equal(merged[k], before[k]), k

    # transformers.pipeline loads the merged folder and agrees with `vitboost predict`
    images = sorted(str(p) for p in (tiny_beans / "test").rglob("*.jpg"))
    capsys.readouterr()
    assert main(["predict", "--model", str(out / "model"), "--json", *images]) == 0
    ours = json.loads(capsys.readouterr().out)
    pipe = pipeline("image-classification", model=str(out / "model"), device="cpu")
    assert [r["predictions"][0]["label"] for r in ours] == [t[0]["label"] for t in pipe(images, top_k=1)]

    # the adapter alone, on the pretrained base, computes what the merged model computes
    base_model = ViTForImageClassification.from_pretrained(pretrained, num_labels=3, ignore_mismatched_sizes=True)
    with_adapter = PeftModel.from_pretrained(base_model, out / "adapter").eval()
    plain = ViTForImageClassification.from_pretrained(out / "model").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(pixel_values=x).logits, plain(pixel_values=x).logits,
                                   rtol=1e-4, atol=1e-5)
    # `vitboost export --adapter` writes the same adapter from the checkpoint
    assert main(["export", "--checkpoint", str(out), "--output", str(tmp_path / "m"), "--adapter",
                 str(tmp_path / "a")]) == 0
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_run_resumed_mid_run_is_bitwise_the_uninterrupted_run(tiny_beans, tmp_path, capsys):
    straight = tmp_path / "straight"
    args = (*LORA, "--save_every", "2", "--keep_checkpoints", "10")
    assert main(train_args(tiny_beans, straight, *args)) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("model", "adapter", "summary.json"))
    for ckpt in (resumed / "checkpoints").iterdir():
        if ckpt.name != "step_00000002":
            shutil.rmtree(ckpt)
    # a LoRA checkpoint resumed without the same LoRA: one line that names the fix
    fails_with(capsys, train_args(tiny_beans, resumed, "--resume", "auto"), "--lora_rank 4")
    fails_with(capsys, train_args(tiny_beans, resumed, "--resume", "auto", "--lora_rank", "8"), "--lora_rank 4")
    fails_with(capsys, train_args(tiny_beans, resumed, "--resume", "auto", *LORA, "--lora_targets", "q_proj"),
               "--lora_targets")
    assert main(train_args(tiny_beans, resumed, *args, "--resume", "auto")) == 0
    assert "resumed from" in capsys.readouterr().out
    for folder, name in (("model", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        a, b = load_file(straight / folder / name), load_file(resumed / folder / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_lora_flags_that_cannot_work_are_one_error_line(tiny_beans, tmp_path, capsys):
    run = tmp_path / "run"
    fails_with(capsys, train_args(tiny_beans, run, "--lora_alpha", "8"), "--lora_alpha", "--lora_rank")
    fails_with(capsys, train_args(tiny_beans, run, *LORA, "--plugin", "hybrid_parallel", "--tp_size", "2"),
               "--tp_size", "--plugin fsdp")
    fails_with(capsys, train_args(tiny_beans, run, *LORA, "--lora_targets", "qkv"), "'qkv'", "q_proj")
    assert not run.exists()


def _train_each(configs: list[dict]) -> None:
    """Several trainings in the same spawned processes (spawning costs more than these runs)."""
    from vitboost.config import TrainConfig
    from vitboost.train import train
    for overrides in configs:
        train(TrainConfig(**overrides))


STRATEGIES = {  # batch_size is per data-parallel rank: 2 ranks x 4 = the reference's 8
    "fsdp": {"plugin": "fsdp", "batch_size": 4},
    "zero1": {"plugin": "low_level_zero", "zero_stage": 1, "batch_size": 4},
    "gemini": {"plugin": "gemini", "batch_size": 4},
    "pp2": {"plugin": "hybrid_parallel", "pp_size": 2},
}


def test_lora_under_fsdp_zero_gemini_and_pipeline_reproduces_one_process(tiny_beans, vit4_dir, tmp_path):
    """The guarantee of tests/test_strategies.py, with LoRA: same losses, merged weights and evals."""
    ref = tmp_path / "ref" / "run"
    run_distributed(_train_each, 1, [base(tiny_beans, vit4_dir, ref, lora_rank=4)])
    runs = {name: tmp_path / name / "run" for name in STRATEGIES}
    run_distributed(_train_each, 2, [base(tiny_beans, vit4_dir, runs[name], lora_rank=4, **kw)
                                     for name, kw in STRATEGIES.items()])
    for name, out in runs.items():
        assert (out / "adapter" / "adapter_model.safetensors").is_file(), name
        assert_same(ref, out)
