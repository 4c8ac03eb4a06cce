"""Bad input: one clear line on stderr naming the problem and the fix, exit code 2, nothing half-written."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import make_imagefolder, train_args
from vitboost.cli import main


def fails_with(capsys, args: list[str], *phrases: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for phrase in phrases:
        assert phrase in err, err
    return err


@pytest.fixture()
def data(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "data", {"train": 2, "validation": 1})


@pytest.mark.parametrize("args, phrase", [
    (["train", "--lr_scheduler_type", "cosin"], "invalid choice: 'cosin'"),
    (["train", "--epoch", "3", "--lr"], "expected one argument"),
    (["train", "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ([], "required: command"),
])
def test_a_misspelt_flag_or_value_is_one_line_naming_it_and_the_help(capsys, args, phrase):
    err = fails_with(capsys, args, phrase, "--help`")
    assert "usage:" not in err


def test_help_and_a_misspelt_flag_answer_without_loading_torch():
    # 3-4 s of imports on 2 cores (10+ s where Python may not write bytecode) for a line of text
    import subprocess
    import sys
    code = ("import sys\nfrom vitboost.cli import main\n"
            "codes = [main(['--help']), main(['train', '--no_such_flag']), main(['bench', '--help'])]\n"
            "print(codes, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip().splitlines()[-1] == "[0, 2, 0] False", run.stderr


def test_missing_dataset_folder(capsys, tmp_path):
    fails_with(capsys, train_args(tmp_path / "nope", tmp_path / "run"), "does not exist")
    assert not (tmp_path / "run").exists()


def test_a_step_the_layout_cannot_run_is_refused_before_anything_is_written(capsys, data, tmp_path):
    fails_with(capsys, train_args(data, tmp_path / "run", "-b", "2", "--cuda_graph", "true", "--device", "cpu"),
               "--cuda_graph true is not possible")
    assert not (tmp_path / "run").exists()


def test_empty_class_folder(capsys, data, tmp_path):
    (data / "train" / "empty_class").mkdir()
    fails_with(capsys, train_args(data, tmp_path / "run"), "empty_class")
    assert not (tmp_path / "run").exists()


def test_validation_label_unknown_to_train(capsys, data, tmp_path):
    shutil.copytree(data / "validation" / "healthy", data / "validation" / "mystery")
    fails_with(capsys, train_args(data, tmp_path / "run"), "mystery")


def test_corrupt_image_is_named_and_can_be_skipped(capsys, data, tmp_path):
    bad = data / "train" / "healthy" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    fails_with(capsys, train_args(data, tmp_path / "run"), "broken.jpg", "--skip_bad_images")
    assert main(train_args(data, tmp_path / "run", "--epochs", "1", "-b", "2", "--skip_bad_images")) == 0


def test_grayscale_cmyk_and_rgba_images_are_converted_not_rejected(capsys, data, tmp_path):
    from PIL import Image
    src = next((data / "train" / "healthy").iterdir())
    img = Image.open(src)
    img.convert("L").save(data / "train" / "healthy" / "gray.jpg")
    img.convert("CMYK").save(data / "train" / "healthy" / "cmyk.jpg")
    img.convert("RGBA").save(data / "train" / "healthy" / "rgba.png")
    assert main(train_args(data, tmp_path / "run", "--epochs", "1", "-b", "3")) == 0


def test_unknown_model(capsys, data, tmp_path):
    fails_with(capsys, train_args(data, tmp_path / "run", "--model", "vit-enormous"), "vit-enormous", "vit-base")


def test_hub_model_unreachable_names_the_offline_alternative(capsys, data, tmp_path):
    fails_with(capsys, train_args(data, tmp_path / "run", "--model", "google/vit-base-patch16-224"),
               "google/vit-base-patch16-224", "--pretrained none")


def test_unreadable_config(capsys, data, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: [1, 2\n")
    fails_with(capsys, train_args(data, tmp_path / "run", "--config", str(cfg)), "bad.yaml", "YAML")
    cfg.write_text("epochz: 3\n")
    fails_with(capsys, train_args(data, tmp_path / "run", "--config", str(cfg)), "epochz")


def test_output_holding_another_run_is_refused_unless_resume_or_overwrite(capsys, data, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(data, run, "--epochs", "1", "-b", "3")) == 0
    before = sorted(p.name for p in run.iterdir())
    fails_with(capsys, train_args(data, run, "--epochs", "1", "-b", "3"), "--resume auto", "--overwrite")
    assert sorted(p.name for p in run.iterdir()) == before
    assert main(train_args(data, run, "--epochs", "1", "-b", "3", "--overwrite")) == 0


@pytest.mark.parametrize("extra, phrase", [
    (["--mixed_precision", "fp16", "--device", "cpu"], "fp16"),  # fp16 runs on a GPU: the error is the CPU's
    (["--plugin", "torch_ddp_fp16", "--device", "cpu"], "fp16"),
    (["--plugin", "hybrid_parallel", "--pp_size", "2"], "world size 1"),
    (["--tp_size", "2"], "hybrid_parallel"),
    (["--lr", "-1"], "--lr"),
    (["--mixup", "-1"], "--mixup"),
    (["--label_smoothing", "1.5"], "--label_smoothing"),
])
def test_configs_that_cannot_run(capsys, data, tmp_path, extra, phrase):
    fails_with(capsys, train_args(data, tmp_path / "run", *extra), phrase)


def test_predict_on_missing_image(capsys, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(tmp_path / "m")
    capsys.readouterr()  # save_pretrained's progress bar, shown unless an earlier test's run turned it off
    fails_with(capsys, ["predict", "--model", str(tmp_path / "m"), str(tmp_path / "missing.jpg")], "missing.jpg")


def test_layouts_that_do_not_fit_the_model():
    from vitboost.config import ConfigError, TrainConfig
    from vitboost.model import build_model
    from vitboost.parallel.dims import LayoutError, ParallelDims
    from vitboost.train import _check_layout
    model, _ = build_model("vit-micro", ["a", "b"], log=lambda *_: None)  # 4 heads, 2 layers
    cfg = TrainConfig(plugin="hybrid_parallel")
    with pytest.raises(ConfigError, match="4 attention heads are not divisible by --tp_size 3"):
        _check_layout(cfg, model, ParallelDims(3, tp=3))
    with pytest.raises(ConfigError, match="2 layers cannot fill 4 pipeline stages"):
        _check_layout(cfg, model, ParallelDims(4, pp=4))
    with pytest.raises(LayoutError, match="world size 6 is not divisible by tp_size\\*pp_size = 2\\*2"):
        ParallelDims(6, tp=2, pp=2)


def test_cuda_is_started_early_only_for_a_run_that_may_use_a_gpu(tmp_path):
    from vitboost.cli import _may_use_gpu, build_parser
    on_cpu = tmp_path / "cpu.yaml"
    on_cpu.write_text("device: cpu\n")
    parse = build_parser().parse_args
    assert _may_use_gpu(parse(["train"])) and _may_use_gpu(parse(["train", "--device", "cuda"]))
    assert not _may_use_gpu(parse(["train", "--device", "cpu"]))
    assert not _may_use_gpu(parse(["train", "--config", str(on_cpu)]))  # the config file's device
    assert _may_use_gpu(parse(["train", "--config", str(on_cpu), "--device", "auto"]))  # a flag overrides it
    broken = tmp_path / "broken.yaml"
    broken.write_text("device: [unclosed\n")
    assert _may_use_gpu(parse(["train", "--config", str(broken)]))  # reported later, by make_config
