"""torchrun does the launching: two simulated nodes, and an elastic restart after a rank is killed; `vitboost
launch` is torchrun run from vitboost (its own process keeps bytecode), and a rank's bad input ends it in one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import REPO
from tests.distributed import free_port
from tests.test_strategies import assert_params_close
from vitboost.checkpoint import is_complete

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def vitboost_launch(*args: str) -> list[str]:
    """torchrun's options, then a command as train_flags gives it (`-m vitboost train ...`)."""
    options, command = list(args[:args.index("-m")]), list(args[args.index("-m") + 2:])
    return [sys.executable, "-m", "vitboost", "launch", *options, *command]


def train_flags(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "vitboost", "train", "--model", str(model), "--pretrained", "none", "--dataset", str(data),
            "--output", str(out), "--cache_dir", str(out.parent / "cache"), "--epochs", "2", "-b", "4",
            "--lr", "1e-3", "--mixed_precision", "fp32", "--device", "cpu", "--seed", "3", "--no-progress",
            "--log_every", "1", *extra]


def children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def test_two_simulated_nodes_run_a_hybrid_job(tiny_beans, vit4_dir, tmp_path):
    """2 nodes x 2 processes, c10d rendezvous, pp=2 x dp=2 (each node is one pipeline). A rank whose
    command returned skips the interpreter's teardown, where gloo's threads can abort it (cli._leave):
    an exit hook planted in every process runs in the two launchers and in no rank."""
    hooks, marks = tmp_path / "hooks", tmp_path / "teardowns"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os\n"
        f"atexit.register(lambda: open({str(marks)!r}, 'a').write(os.environ.get('RANK', 'launcher') + '\\n'))\n")
    env = {**ENV, "PYTHONPATH": f"{hooks}{os.pathsep}{ENV['PYTHONPATH']}"}
    out, port = tmp_path / "run", free_port()
    rdzv = ["--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "vitboost-test"]
    flags = train_flags(tiny_beans, vit4_dir, out, "--plugin", "hybrid_parallel", "--pp_size", "2",
                        "--max_steps", "3", "-b", "4")
    nodes = [subprocess.Popen(torchrun(*rdzv, *flags), env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(logs)
    assert sorted(marks.read_text().split()) == ["launcher", "launcher"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"]["world_size"] == 4 and summary["strategy"]["pp"] == 2 and summary["strategy"]["dp"] == 2
    assert summary["eval"]["validation"]["num_samples"] == 9
    # the launch counts from the launcher's start, so its imports and rendezvous are in the seconds to accuracy
    assert 0 < summary["launch_marks_s"]["rank_started"] < summary["timings_s"]["launch"]


def test_elastic_restart_after_sigkill_resumes_and_matches_an_unbroken_run(tiny_beans, vit4_dir, tmp_path):
    extra = ["--plugin", "torch_ddp", "--save_every", "1", "--resume", "auto"]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    launch = ["--nproc_per_node", "2", "--max-restarts", "1", "--rdzv_backend", "c10d"]
    ref = subprocess.run(torchrun(*launch, "--rdzv_endpoint", f"localhost:{free_port()}",
                                  *train_flags(tiny_beans, vit4_dir, unbroken, *extra)),
                         env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    p = subprocess.Popen(torchrun(*launch, "--rdzv_endpoint", f"localhost:{free_port()}",
                                  *train_flags(tiny_beans, vit4_dir, broken, *extra)),
                         env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.time() + 300
    while not is_complete(broken / "checkpoints" / "step_00000003"):  # mid epoch 2 of 2 (3 steps per epoch)
        assert time.time() < end and p.poll() is None, "no checkpoint appeared"
        time.sleep(0.005)
    workers = children(p.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one rank dies; torchrun restarts the group once
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log
    assert "resumed from" in log, log
    a = json.loads((unbroken / "summary.json").read_text())
    b = json.loads((broken / "summary.json").read_text())
    assert a["steps"] == b["steps"] == 6
    for split in ("validation", "test"):
        assert b["eval"][split]["confusion_matrix"] == a["eval"][split]["confusion_matrix"]
    assert_params_close(load_file(unbroken / "model" / "model.safetensors"),
                        load_file(broken / "model" / "model.safetensors"))


def test_vitboost_launch_ends_on_a_ranks_bad_input_with_its_one_line_and_its_exit_code(tiny_beans, vit4_dir, tmp_path):
    out = tmp_path / "run"
    flags = train_flags(tmp_path / "no_such_folder", vit4_dir, out, "--plugin", "torch_ddp")
    r = subprocess.run(vitboost_launch("--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                                       f"localhost:{free_port()}", *flags),
                       env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "no_such_folder does not exist" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "launch: rank 0 exited with code 2" in r.stderr  # rank 1 left quietly
    assert not out.exists()  # nothing half-written


def test_vitboost_launch_finds_the_command_after_torchruns_options():
    from vitboost.launch import split_command
    valued = frozenset({"--nproc_per_node", "--role"})  # torchrun's options that take a value (from its parser)
    assert split_command(["--nproc_per_node", "2", "--standalone", "train", "--epochs", "1"], valued) == (
        ["--nproc_per_node", "2", "--standalone"], ["train", "--epochs", "1"])
    assert split_command(["--role", "train", "eval", "--split", "test"], valued) == (  # a value, not the command
        ["--role", "train"], ["eval", "--split", "test"])
    assert split_command(["--nproc_per_node", "2", "-m", "vitboost", "bench"], valued) == (  # the torchrun habit
        ["--nproc_per_node", "2"], ["bench"])


def test_vitboost_launch_knows_every_command_the_cli_has():
    """launch.py names the commands itself (it runs before the CLI's parser is built): the two lists agree."""
    import argparse
    from vitboost.cli import build_parser
    from vitboost.launch import COMMANDS
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(COMMANDS) == set(sub.choices) - {"launch"}


def test_vitboost_launch_refuses_a_command_line_it_cannot_run_in_one_line(capsys):
    from vitboost.cli import main
    for argv, says in ((["launch", "--nproc_per_node", "2"], "needs a command after torchrun's options"),
                       (["launch", "--nproc_per_node", "2", "--no_such_option", "train"], "--no_such_option")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and says in err and len(err.splitlines()) == 1, err
    assert main(["launch", "--help"]) == 0 and "torchrun options" in capsys.readouterr().out
