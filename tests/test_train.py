"""Single-process training: it learns, it resumes bitwise, it survives kills, it exports."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, eval_rel, train_args
from vitboost.checkpoint import is_complete, latest_checkpoint
from vitboost.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitboost", *args], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_cli(args: list[str]) -> str:
    p = cli(args)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return out


def kill_when(p: subprocess.Popen, condition, timeout: float = 300) -> None:
    """SIGKILL the process the moment condition() holds (polled every millisecond)."""
    end = time.time() + timeout
    while time.time() < end and p.poll() is None:
        if condition():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return
        time.sleep(0.001)
    raise AssertionError(f"condition never held; process output:\n{p.communicate()[0]}")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def test_training_learns_and_evaluates_every_sample(tiny_beans, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--epochs", "6")) == 0
    printed = capsys.readouterr().out
    assert "eval accuracy: " in printed and "(validation, 9 images)" in printed and "(test, 6 images)" in printed
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 6 * 3  # 24 images / batch 8 = 3 steps per epoch
    assert sum(losses[-3:]) < sum(losses[:3]) * 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["validation"]["num_samples"] == 9
    assert summary["eval"]["test"]["num_samples"] == 6
    cm = summary["eval"]["validation"]["confusion_matrix"]
    assert sum(map(sum, cm)) == 9 and len(cm) == 3
    assert (out / "config.yaml").is_file() and (out / "model" / "model.safetensors").is_file()


def test_progress_in_a_log_file_is_a_plain_line_about_20_times_a_run_and_at_its_last_step(tiny_beans, tmp_path,
                                                                                                capsys):
    # 14 epochs x 3 steps, a metrics row every step: a line every 42 // 20 = 2 steps (stdout is not a terminal)
    assert main(train_args(tiny_beans, tmp_path / "run", "--epochs", "14", "--eval_every", "0", "--progress")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(2, 43, 2))
    assert lines[-1].startswith("step 42/42 epoch 14 loss ") and " grad_norm " in lines[-1] and " img/s " in lines[-1]


@pytest.mark.parametrize("writes", ["--async_checkpoint", "--no-async_checkpoint"])
def test_two_epochs_equal_one_epoch_killed_and_resumed_bitwise(tiny_beans, tmp_path, writes):
    # async: the state written must be the step's snapshot, untouched by the training that goes on
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_cli(train_args(tiny_beans, straight, "--save_every", "2", writes))
    # kill right after the mid-epoch checkpoint of step 2 appears (epoch 1 has 3 steps)
    p = cli(train_args(tiny_beans, broken, "--save_every", "2", writes))
    kill_when(p, lambda: is_complete(broken / "checkpoints" / "step_00000002"))
    assert not (broken / "summary.json").exists(), "the run must have been interrupted"
    run_cli(train_args(tiny_beans, broken, "--save_every", "2", "--resume", "auto", writes))
    a, b = weights(straight), weights(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_every_background_checkpoint_holds_its_own_steps_state(tiny_beans, tmp_path, monkeypatch, device):
    # the state is copied at its step and written while training goes on: no write may see a later step's values
    # (on a GPU, with a write in flight while the step is being captured as a CUDA graph)
    import torch.distributed.checkpoint as dcp
    from torch.utils._pytree import tree_map
    import vitboost.checkpoint as ckpt
    staged, real_state = [], ckpt._state

    def snapshot(engine):
        state = real_state(engine)
        staged.append(tree_map(lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v, state))
        return state
    monkeypatch.setattr(ckpt, "_state", snapshot)
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--device", device, "--save_every", "1", "--keep_checkpoints", "0",
                           "--async_checkpoint", "--no-export")) == 0
    folders = sorted((out / "checkpoints").glob("step_*"))
    assert len(folders) == len(staged) == 6  # 2 epochs x 3 steps, one save per step
    for folder, expected in zip(folders, staged):
        on_disk = tree_map(lambda v: torch.empty_like(v) if isinstance(v, torch.Tensor) else v, expected)
        dcp.load(on_disk, checkpoint_id=folder)
        tensors = [(k, v) for k, v in leaves(expected) if isinstance(v, torch.Tensor)]
        assert any(k.startswith("optim.") and "exp_avg" in k for k, _ in tensors)  # AdamW's moments too
        got = dict(leaves(on_disk))
        for name, want in tensors:
            assert torch.equal(got[name], want), (folder.name, name)
    first, last = staged[0]["model"], staged[-1]["model"]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the steps really differ


def leaves(tree, prefix: str = ""):
    """(dotted key, value) for every leaf of a nested state dict."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


@pytest.mark.parametrize("min_seconds, saved", [("60", ["step_00000009"]),
                                                 ("0", ["step_00000003", "step_00000006", "step_00000009"])])
def test_epochs_closer_than_save_min_seconds_to_the_last_checkpoint_are_not_saved(tiny_beans, tmp_path, capsys,
                                                                                  min_seconds, saved):
    # a seconds-long run under the default writes only its last state; 0 writes every epoch. Blocking writes:
    # an epoch's write is never skipped for the previous one still running (_writer_busy, its own test), which
    # a fast GPU step beside a busy CPU made happen (BENCHMARKS.md section 32)
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--epochs", "3", "--keep_checkpoints", "0", "--no-export",
                           "--save_min_seconds", min_seconds, "--no-async_checkpoint")) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == saved
    said = capsys.readouterr().out.count("are not saved (--save_min_seconds")
    assert said == (min_seconds != "0")  # once a run
    assert main(train_args(tiny_beans, out, "--epochs", "4", "--resume", "auto", "--no-export",
                           "--save_min_seconds", min_seconds)) == 0  # the last state resumes


def _paced_run(data: str, out: str) -> list[bool]:
    """A 2-rank run whose rank 1 alone believes its last checkpoint is long past; each rank's decisions."""
    import torch.distributed as dist
    import vitboost.train as train_mod
    from vitboost.config import TrainConfig
    decisions, init, too_soon = [], train_mod.SavePace.__init__, train_mod.SavePace.too_soon

    def long_ago(self, min_seconds):
        init(self, min_seconds)
        if dist.get_rank() == 1:
            self.last -= 1e6

    train_mod.SavePace.__init__ = long_ago
    train_mod.SavePace.too_soon = lambda self, say: decisions.append(too_soon(self, say)) or decisions[-1]
    train_mod.train(TrainConfig(model="vit-micro", pretrained="none", dataset=data, output=out, epochs=3,
                                batch_size=8, cache_dir=str(Path(out).parent / "cache"), progress=False,
                                export=False, device="cpu", keep_checkpoints=0))
    return decisions


def test_every_rank_agrees_on_skipping_an_epochs_checkpoint(tiny_beans, tmp_path):
    # a collective decision (rank 0's clock): had rank 1 followed its own clock, it alone would have written
    from tests.distributed import run_distributed
    out = tmp_path / "run"
    assert run_distributed(_paced_run, 2, str(tiny_beans), str(out)) == [[True, True], [True, True]]
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000003"]  # 1 step an epoch (2 x 8 of 24)


def test_sigkill_during_checkpoint_write_leaves_previous_checkpoint_loadable(tiny_beans, tmp_path):
    for attempt in range(5):
        out = tmp_path / f"run{attempt}"
        ckpts = out / "checkpoints"
        p = cli(train_args(tiny_beans, out, "--save_every", "1"))

        def writing() -> bool:
            names = os.listdir(ckpts) if ckpts.is_dir() else []
            return any(n.startswith(".tmp_step_") for n in names) and any(n.startswith("step_") for n in names)

        kill_when(p, writing)
        if any(n.startswith(".tmp_step_") for n in os.listdir(ckpts)):
            break  # killed mid-write
    else:
        pytest.skip("could not land a kill inside a checkpoint write in 5 tries")
    last = latest_checkpoint(ckpts)
    assert last is not None and is_complete(last)
    run_cli(["export", "--checkpoint", str(last), "--output", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    out_text = run_cli(train_args(tiny_beans, out, "--resume", "auto"))
    assert f"resumed from {last}" in out_text


def test_export_loads_in_transformers_pipeline_and_agrees_with_predict(tiny_beans, tmp_path, capsys):
    from transformers import pipeline
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out)) == 0
    images = sorted(str(p) for p in (tiny_beans / "test").rglob("*.jpg"))
    capsys.readouterr()
    assert main(["predict", "--model", str(out / "model"), "--json", "--top_k", "3", *images]) == 0
    ours = json.loads(capsys.readouterr().out)
    pipe = pipeline("image-classification", model=str(out / "model"), device="cpu")
    for row, theirs in zip(ours, pipe(images, top_k=3)):
        assert [p["label"] for p in row["predictions"]] == [t["label"] for t in theirs]
        for p, t in zip(row["predictions"], theirs):
            assert abs(p["score"] - t["score"]) < 2e-3
    # and `vitboost eval` on the folder reproduces the run's own final metrics
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "model"), "--dataset", str(tiny_beans), "--split", "test",
                 "--json", "--cache_dir", str(tmp_path / "cache")]) == 0
    ev = json.loads(capsys.readouterr().out)["test"]
    summary = json.loads((out / "summary.json").read_text())
    assert ev["accuracy"] == summary["eval"]["test"]["accuracy"]
    want = summary["eval"]["test"]["loss"]
    assert abs(ev["loss"] - want) <= eval_rel(summary, 1e-5) * abs(want)  # bf16 on a GPU: 1e-3


def test_yaml_config_with_cli_override_is_resolved_and_saved(tiny_beans, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 1\nlr: 0.01\nbatch_size: 4\n")
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--config", str(cfg), "--epochs", "1", "-b", "12")) == 0
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 1e-3  # train_args passes --lr explicitly: the flag beats the file
    assert saved["batch_size"] == 12 and saved["epochs"] == 1
    out2 = tmp_path / "run2"
    args = [a for a in train_args(tiny_beans, out2, "--config", str(cfg)) if True]
    i = args.index("--lr")
    del args[i:i + 2]
    assert main(args) == 0
    assert yaml.safe_load((out2 / "config.yaml").read_text())["lr"] == 0.01  # the file beats the default


def test_local_pretrained_folder_loads_weights_and_reinitializes_only_the_head(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    from vitboost.model import build_model
    src = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=128, image_size=32, patch_size=8, num_labels=10))
    src.save_pretrained(tmp_path / "pre")
    lines: list[str] = []
    model, pre = build_model(str(tmp_path / "pre"), ["a", "b", "c"], log=lines.append)
    assert model.classifier.out_features == 3 and pre.image_size == 32
    s = src.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.equal(v, s[k]), k
    assert any("re-initialized" in l and "classifier.weight" in l for l in lines)


def test_plot_writes_curves_and_confusion_matrices(tiny_beans, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--plot")) == 0
    for name in ("curves.png", "confusion_validation.png", "confusion_test.png"):
        assert (out / name).stat().st_size > 1000, name


def test_streaming_trains_exactly_like_the_cache(tiny_beans, tmp_path):
    cached, streamed = tmp_path / "cached", tmp_path / "streamed"
    assert main(train_args(tiny_beans, cached, "--epochs", "1")) == 0
    assert main(train_args(tiny_beans, streamed, "--epochs", "1", "--stream")) == 0
    a, b = weights(cached), weights(streamed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_models_use_mask_free_sdpa_whatever_their_source_and_export_plain_configs(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    from vitboost.model import build_model
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8).save_pretrained(tmp_path / "cfg")
    x = torch.randn(3, 3, 32, 32)
    for name, pretrained in (("vit-micro", "auto"), (str(tmp_path / "cfg"), "none")):
        model, _ = build_model(name, ["a", "b"], pretrained=pretrained, log=lambda *_: None)
        assert model.config._attn_implementation == "vitboost_sdpa"
        ours = model(pixel_values=x).logits
        model.config._attn_implementation = "eager"  # HF's reference math
        assert torch.allclose(ours, model(pixel_values=x).logits, atol=1e-5)
        model.save_pretrained(tmp_path / "saved")  # what export writes loads without vitboost's attention
        assert "vitboost" not in (tmp_path / "saved" / "config.json").read_text()
        plain = ViTForImageClassification.from_pretrained(tmp_path / "saved")
        assert plain.config._attn_implementation != "vitboost_sdpa"


def test_one_gemm_for_q_k_v_computes_hf_attention_and_keeps_its_parameters(tmp_path):
    import copy
    from transformers import ViTForImageClassification
    from vitboost.model import build_model, fuse_qkv
    from vitboost.parallel.tensor import find_blocks
    torch.manual_seed(0)
    model, _ = build_model("vit-micro", ["a", "b"], pretrained="none", log=lambda *_: None)
    if not hasattr(find_blocks(model)[0][1].attention, "q_proj"):
        pytest.skip("transformers 4.x attention layout: left unfused")
    fused = copy.deepcopy(model).train()
    model.train()
    assert fuse_qkv(fused) == model.config.num_hidden_layers
    x = torch.randn(3, 3, 32, 32)
    ref, out = model(pixel_values=x).logits, fused(pixel_values=x).logits
    assert torch.allclose(ref, out, atol=1e-6)
    ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    assert fused.state_dict().keys() == model.state_dict().keys()  # checkpoints and export unchanged
    fused.save_pretrained(tmp_path / "saved")
    plain = ViTForImageClassification.from_pretrained(tmp_path / "saved").eval()
    assert torch.allclose(plain(pixel_values=x).logits, fused.eval()(pixel_values=x).logits, atol=1e-5)


def test_q_k_v_stay_apart_where_something_wraps_them():
    import copy
    from vitboost.config import TrainConfig
    from vitboost.lora import apply_lora
    from vitboost.model import build_model, fuse_qkv
    model, _ = build_model("vit-micro", ["a", "b"], pretrained="none", log=lambda *_: None)
    wrapped = apply_lora(copy.deepcopy(model), TrainConfig(model="vit-micro", lora_rank=4), log=lambda *_: None)
    assert fuse_qkv(wrapped) == 0  # peft's layers hold q, k and v: LoRA trains them as peft computes them


def test_fused_q_k_v_can_be_switched_off_for_a_b_measurements(monkeypatch):
    from vitboost.model import build_model, fuse_qkv
    model, _ = build_model("vit-micro", ["a", "b"], pretrained="none", log=lambda *_: None)
    monkeypatch.setenv("VITBOOST_FUSED_QKV", "0")
    assert fuse_qkv(model) == 0


def test_summary_breaks_the_run_time_down_by_phase(tiny_beans, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--epochs", "2")) == 0
    s = json.loads((out / "summary.json").read_text())
    phases = ("launch", "startup", "data", "model", "teacher", "resume", "train", "final_eval", "final_checkpoint",
              "export")
    assert tuple(s["timings_s"]) == phases and all(v >= 0 for v in s["timings_s"].values())
    assert abs(sum(s["timings_s"].values()) - s["total_seconds"]) < 0.1
    before_accuracy = sum(v for k, v in s["timings_s"].items() if k not in ("final_checkpoint", "export"))
    assert abs(s["seconds_to_accuracy"] - before_accuracy) < 0.1  # the accuracy is printed before those two
    inside = s["train_breakdown_s"]  # the train phase: stepping, epoch-end validations, epoch 1's checkpoint
    assert set(inside) == {"steps", "validation", "checkpoints"} and all(v > 0 for v in inside.values())
    assert abs(sum(inside.values()) - s["timings_s"]["train"]) < 0.01


def test_summary_marks_where_a_processs_launch_went(tiny_beans, tmp_path):
    # a machine's first run can spend 20 s before training: interpreter, imports (disk reads, bytecode), driver
    out = tmp_path / "run"
    run_cli(train_args(tiny_beans, out, "--epochs", "1", "--device", "cpu"))
    s = json.loads((out / "summary.json").read_text())
    marks = s["launch_marks_s"]
    assert list(marks) == ["vitboost_imported", "cli_started", "transformers_imported"]  # in the order they happened
    seconds = list(marks.values())
    assert 0 < seconds[0] <= seconds[1] <= seconds[2] <= s["timings_s"]["launch"]


def test_the_last_checkpoint_is_saved_after_the_final_evaluation(tiny_beans, tmp_path, monkeypatch):
    # a write running beside the final eval slowed it 4x: the accuracy is printed first, then the state is saved
    import vitboost.checkpoint as ckpt
    import vitboost.train as train_module
    out, at_test_eval = tmp_path / "run", []
    real = train_module.evaluate

    def spy(engine, split, *a, **k):
        if len(split) == 6:  # the test split, evaluated only at the end
            pending = ckpt._pending.final.name if ckpt._pending is not None else None
            at_test_eval.append((pending, (out / "checkpoints" / "step_00000006").exists()))
        return real(engine, split, *a, **k)
    monkeypatch.setattr(train_module, "evaluate", spy)
    assert main(train_args(tiny_beans, out, "--async_checkpoint")) == 0  # 2 epochs x 3 steps
    assert len(at_test_eval) == 1 and at_test_eval[0][0] != "step_00000006" and not at_test_eval[0][1]
    assert is_complete(out / "checkpoints" / "step_00000006")


def test_the_final_validation_is_the_last_epochs_not_a_second_pass(tiny_beans, tmp_path, monkeypatch):
    import vitboost.train as train_module
    splits = []
    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda engine, split, *a, **k: splits.append(len(split)) or
                        real(engine, split, *a, **k))
    out = tmp_path / "run"
    assert main(train_args(tiny_beans, out, "--epochs", "2")) == 0
    assert splits == [9, 9, 6]  # validation after each epoch, then only test (9 and 6 images)
    s = json.loads((out / "summary.json").read_text())
    assert s["eval"]["validation"]["loss"] == s["history"][-1]["val_loss"]


def test_the_launch_phase_starts_when_the_process_started_or_a_torchrun_ranks_launcher_did(monkeypatch):
    import vitboost
    from vitboost.cli import _started, process_start
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    marks = {}
    own = process_start(marks)
    assert own < vitboost.IMPORTED and marks == {}  # /proc says the process started before vitboost was imported
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # a torchrun rank: its parent is the launcher
    launcher = process_start(marks)
    assert launcher == pytest.approx(_started(str(os.getppid())), abs=0.02) and launcher <= own
    assert marks["rank_started"] == pytest.approx(own, abs=0.02)


@pytest.mark.parametrize("extra", [(), ("--ema", "0.9"), ("--lora_rank", "4", "--lr", "5e-3")],
                         ids=["plain", "ema", "lora"])
def test_a_run_exports_from_memory_what_the_checkpoint_export_writes_bitwise(extra, tiny_beans, tmp_path, monkeypatch):
    """One process: the run ends by exporting the weights it holds (EMA when --ema, merged when LoRA), not by
    reading back its last checkpoint; `vitboost export` of that checkpoint writes the same bytes."""
    import vitboost.train

    def unused(*a, **kw):
        raise AssertionError("an unsharded run exports from memory, not from its checkpoint")

    monkeypatch.setattr(vitboost.train, "export_checkpoint", unused)
    run = tmp_path / "run"
    assert main(train_args(tiny_beans, run, *extra)) == 0
    monkeypatch.undo()
    last = run / "checkpoints" / "step_00000006"
    adapter = ["--adapter", str(tmp_path / "adapter")] if "--lora_rank" in extra else []
    assert main(["export", "--checkpoint", str(last), "--output", str(tmp_path / "hf"), *adapter]) == 0
    names = ["model.safetensors", "config.json", "preprocessor_config.json"]
    for name in names:
        assert (run / "model" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    if adapter:
        name = "adapter_model.safetensors"
        assert (run / "adapter" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()


def test_a_per_epoch_checkpoint_never_waits_for_the_previous_write_and_the_run_still_resumes(
        tiny_beans, tmp_path, monkeypatch, capsys):
    """The step-3 write (end of epoch 1 of 3) is held until step 7: the epoch-2 checkpoint is skipped, not
    waited for; the last one (step 9) is written, and a resume from step 3 ends where the run ended."""
    import threading
    from concurrent.futures import Future

    import vitboost.checkpoint
    import vitboost.train
    gate, steps = threading.Event(), [0]
    async_save, publish = vitboost.checkpoint.dcp.async_save, vitboost.train.publish_finished

    def held(*a, **kw):
        inner, outer = async_save(*a, **kw), Future()

        def finish():
            gate.wait(timeout=60)  # without the skip, the epoch-2 save waits this long, then the asserts fail
            outer.set_result(inner.result())
        threading.Thread(target=finish, daemon=True).start()
        return outer

    def count():  # called once after every step
        steps[0] += 1
        if steps[0] == 7:
            gate.set()
        publish()

    monkeypatch.setattr(vitboost.checkpoint.dcp, "async_save", held)
    monkeypatch.setattr(vitboost.train, "publish_finished", count)
    run = tmp_path / "run"
    assert main(train_args(tiny_beans, run, "--epochs", "3")) == 0
    monkeypatch.undo()
    assert "checkpoint: step 6 skipped, the previous checkpoint is still being written" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000009"]
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("model", "summary.json", "step_00000009"))
    assert main(train_args(tiny_beans, resumed, "--epochs", "3", "--resume", "auto")) == 0
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000003'} at step 3" in capsys.readouterr().out
    a, b = weights(run), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fp16_on_the_cpu(monkeypatch) -> None:
    """The CLI refuses fp16 on the CPU (no loss scaling there): the fp32 plan with its precision replaced
    runs the GPU's fp16 path, LossScale and fused step included, under CPU autocast."""
    import dataclasses

    import vitboost.train as train_mod
    real = train_mod.make_plan
    monkeypatch.setattr(train_mod, "make_plan", lambda *a, **k: dataclasses.replace(real(*a, **k), precision="fp16"))


def _spoil_loss_from_step(set_attr, times: float, from_step: int, rank: int | None = None) -> None:
    """train's soft_cross_entropy times a factor that becomes ``times`` (inf, nan) at the ``from_step``-th training
    step, on ``rank`` alone when given. The factor is a device tensor the loss reads and a step call on the host
    fills, so a step captured as one CUDA graph (the default on a GPU) sees it change as an eager step does.
    ``set_attr`` installs the two patches: pytest's monkeypatch.setattr, or setattr in a spawned rank."""
    import torch.distributed as dist
    import vitboost.train as train_mod
    from vitboost.engine import Engine
    real_loss, real_step, factors, now, steps = train_mod.soft_cross_entropy, Engine.train_step, {}, [1.0], []

    def loss(logits, *a, **k):
        if logits.device not in factors:  # made at the first step's forward, before any capture
            factors[logits.device] = torch.full((), now[0], device=logits.device)
        return real_loss(logits, *a, **k) * factors[logits.device]

    def train_step(self, *a, **k):
        steps.append(1)
        if len(steps) == from_step and (rank is None or dist.get_rank() == rank):
            now[0] = times
            for factor in factors.values():
                factor.fill_(times)
        return real_step(self, *a, **k)

    set_attr(train_mod, "soft_cross_entropy", loss)
    set_attr(Engine, "train_step", train_step)


def _logged(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_fp16_logs_its_loss_scale_and_stops_with_what_to_do_once_it_has_fallen_below_one(tiny_beans, tmp_path,
                                                                                          monkeypatch, capsys):
    """Each overflowing fp16 step is skipped and halves the scale; 17 in a row take it from 2**16 below 1,
    where the weights have stopped moving: the row is logged, then one error line saying so and what to
    use, exit 2."""
    assert main(train_args(tiny_beans, tmp_path / "fp32", "--epochs", "1")) == 0
    assert all("loss_scale" not in row for row in _logged(tmp_path / "fp32"))  # no loss scale, no column

    _fp16_on_the_cpu(monkeypatch)
    assert main(train_args(tiny_beans, tmp_path / "fp16", "--epochs", "1")) == 0
    assert [row["loss_scale"] for row in _logged(tmp_path / "fp16")] == [2.0 ** 16] * 3  # no overflow: it holds

    _spoil_loss_from_step(monkeypatch.setattr, float("inf"), 1)
    capsys.readouterr()
    out = tmp_path / "overflows"
    assert main(train_args(tiny_beans, out, "--epochs", "10", "--no-async_checkpoint")) == 2
    err = capsys.readouterr().err
    assert "error: the fp16 loss scale fell to 0.5 by step 17:" in err and "--mixed_precision bf16" in err
    assert [row["loss_scale"] for row in _logged(out)] == [2.0 ** (15 - i) for i in range(17)]  # halved each step
    assert latest_checkpoint(out / "checkpoints").name == "step_00000015"  # the epochs before it stay resumable


@pytest.mark.parametrize("log_every, nan_from, stops_at", [
    ("1", 8, 8),     # found at its log row, before the epoch's checkpoint at step 9
    ("100", 4, 6),   # no log row between: found by the epoch's checkpoint at step 6, which is not saved
])
def test_a_diverged_run_stops_before_any_checkpoint_of_its_nan_weights(tiny_beans, tmp_path, monkeypatch, capsys,
                                                                      log_every, nan_from, stops_at):
    """bf16/fp32 skip nothing: from a nan loss on, the weights are nan, and checkpoints of them would rotate
    the good ones out (--save_total_limit 2). The run stops with one error line naming the last good one."""
    _spoil_loss_from_step(monkeypatch.setattr, float("nan"), nan_from)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(train_args(tiny_beans, out, "--epochs", "10", "--log_every", log_every, "--no-async_checkpoint")) == 2
    err = capsys.readouterr().err
    assert f"error: training diverged: the gradient norm is nan at step {stops_at}," in err and "lower --lr" in err
    last = latest_checkpoint(out / "checkpoints")
    assert f"the last checkpoint, {last}, was saved before it" in err
    saved = sorted(int(d.name.rsplit("_", 1)[-1]) for d in (out / "checkpoints").iterdir() if "step_" in d.name)
    assert saved[-1] == 3 * ((nan_from - 1) // 3)  # every epoch before the nan, and none after it


def _diverging_rank_1(data: str, out: str) -> str:
    """A 2-rank run whose rank 1 alone gets a nan loss from its 4th step on; the error each rank raised."""
    import vitboost.train as train_mod
    from vitboost.config import ConfigError, TrainConfig
    _spoil_loss_from_step(setattr, float("nan"), 4, rank=1)
    try:
        train_mod.train(TrainConfig(model="vit-micro", pretrained="none", dataset=data, output=out, epochs=20,
                                    batch_size=4, log_every=100, cache_dir=str(Path(out).parent / "cache"),
                                    progress=False, export=False, device="cpu", async_checkpoint=False,
                                    save_min_seconds=0))
    except ConfigError as e:
        return str(e)
    return "finished"


def test_every_rank_stops_at_the_same_step_when_one_ranks_loss_goes_nan(tiny_beans, tmp_path):
    """The norm is all-reduced, so the rank whose batch was fine sees the nan too and stops with it: no rank
    is left waiting in a collective. 3 steps an epoch (24 images / 2 x 4): stopped at step 6's checkpoint."""
    from tests.distributed import run_distributed
    out = tmp_path / "run"
    errors = run_distributed(_diverging_rank_1, 2, str(tiny_beans), str(out))
    assert errors[0] == errors[1] and errors[0].startswith("training diverged: the gradient norm is nan at step 6,")
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000003"]
