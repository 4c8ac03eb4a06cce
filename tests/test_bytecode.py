"""Where an image forbids Python to write bytecode and ships none, a launch keeps it in vitboost's cache and
compiles it ahead; everywhere else Python stays as it was told."""
from __future__ import annotations

import importlib.util
import os
import py_compile
import sys
from pathlib import Path

import pytest

import vitboost.bytecode
from vitboost.bytecode import keep_bytecode


@pytest.fixture
def pkg(monkeypatch, tmp_path) -> Path:
    """An installed package of two modules with no bytecode (the image's torch: the probe), and a manifest
    naming them in import order, plus one that is not installed."""
    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    for name, text in (("__init__", ""), ("a", "A = 1\n"), ("b", "B = 2\n")):
        (pkg / f"{name}.py").write_text(text)
    (tmp_path / "modules.txt").write_text("pkg\npkg.a\nnot_installed\nnot_installed.x\npkg.b\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.setattr(vitboost.bytecode, "PROBE", "pkg")
    return pkg


@pytest.fixture
def forbidden(monkeypatch, tmp_path) -> Path:
    """A process started with PYTHONDONTWRITEBYTECODE and no PYTHONPYCACHEPREFIX, as many images run it;
    vitboost's cache folder in tmp_path. Python's own settings come back after the test."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setenv("VITBOOST_BYTECODE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_first_launch_compiles_the_manifest_ahead_into_the_cache_and_nothing_beside_the_sources(
        pkg, forbidden, tmp_path):
    workers = keep_bytecode(manifest=tmp_path / "modules.txt")
    assert workers  # the probe has no bytecode anywhere: this is a machine's first launch
    assert all(w.wait(60) == 0 for w in workers)
    compiled = [p.name.split(".")[0] for p in forbidden.rglob("*.pyc") if p.parent.name == "pkg"]
    assert sorted(compiled) == ["__init__", "a", "b"]
    assert not (pkg / "__pycache__").exists()
    # this process and the ones it starts (Inductor's compile workers) now read and write it there
    assert sys.pycache_prefix == str(forbidden) and not sys.dont_write_bytecode
    assert os.environ["PYTHONPYCACHEPREFIX"] == str(forbidden)
    assert Path(importlib.util.cache_from_source(str(pkg / "a.py"))).exists()


def test_a_later_launch_or_another_rank_compiles_nothing_ahead(pkg, forbidden, tmp_path, monkeypatch):
    manifest = tmp_path / "modules.txt"
    assert keep_bytecode(compile_ahead=False, manifest=manifest) == []  # local ranks 1..n: rank 0 does it
    assert sys.pycache_prefix == str(forbidden)  # yet they read (and write) their bytecode there
    py_compile.compile(str(pkg / "__init__.py"))  # what a first launch leaves in the cache
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # the next process, as the image starts it
    monkeypatch.setattr(sys, "pycache_prefix", None)
    assert keep_bytecode(manifest=manifest) == []
    assert sys.pycache_prefix == str(forbidden)


def test_a_rank_started_by_vitboost_launch_reads_and_writes_the_folder_its_launcher_handed_down(pkg, forbidden,
                                                                                                 tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "pycache_prefix", str(forbidden))  # PYTHONPYCACHEPREFIX, exported by the launcher
    py_compile.compile(str(pkg / "__init__.py"))  # the launcher imported the probe: its bytecode is in the folder
    assert keep_bytecode(manifest=tmp_path / "modules.txt") == []  # nothing left to compile ahead
    assert sys.pycache_prefix == str(forbidden) and not sys.dont_write_bytecode  # it writes what else it compiles
    assert not (pkg / "__pycache__").exists()


def test_a_rank_of_plain_torchrun_says_vitboost_launch_would_keep_the_launchers_bytecode_too(pkg, forbidden, tmp_path,
                                                                                            monkeypatch):
    from vitboost.bytecode import torchrun_note
    monkeypatch.setattr(vitboost.bytecode, "_kept_here", False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")  # a torchrun rank; plain torchrun hands no folder down
    keep_bytecode(compile_ahead=False, manifest=tmp_path / "modules.txt")
    note = torchrun_note()
    assert note.startswith("launch:") and "`vitboost launch`" in note
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # the next rank, started by vitboost launch: the
    keep_bytecode(compile_ahead=False, manifest=tmp_path / "modules.txt")  # folder came from its launcher
    assert sys.pycache_prefix == str(forbidden) and torchrun_note() is None
    monkeypatch.setattr(vitboost.bytecode, "_kept_here", True)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # one process, no launcher: nothing to say
    assert torchrun_note() is None


@pytest.mark.parametrize("case", ["python may write it", "the user's own prefix", "installed with bytecode", "off",
                                  "folder not writable", "no home folder"])
def test_python_stays_as_it_was_told_where_vitboost_has_no_business_or_no_place(pkg, forbidden, tmp_path,
                                                                                  monkeypatch, case):
    told = {"python may write it": (False, None), "the user's own prefix": (True, str(tmp_path / "theirs"))}
    dont_write, prefix = told.get(case, (True, None))
    monkeypatch.setattr(sys, "dont_write_bytecode", dont_write)
    monkeypatch.setattr(sys, "pycache_prefix", prefix)
    if case == "installed with bytecode":  # pip's default, even where the image sets PYTHONDONTWRITEBYTECODE
        py_compile.compile(str(pkg / "__init__.py"))
    if case == "off":
        monkeypatch.setenv("VITBOOST_BYTECODE", "off")
    if case == "folder not writable":
        (tmp_path / "a_file").write_text("")
        monkeypatch.setenv("VITBOOST_BYTECODE", str(tmp_path / "a_file" / "cache"))
    if case == "no home folder":
        monkeypatch.delenv("VITBOOST_BYTECODE")
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # ~ stays ~: a user with no home
    assert keep_bytecode(manifest=tmp_path / "modules.txt") == []
    assert (sys.dont_write_bytecode, sys.pycache_prefix) == (dont_write, prefix)
    assert "PYTHONPYCACHEPREFIX" not in os.environ and not forbidden.exists()


def test_a_launch_that_recompiles_torchs_bytecode_every_run_says_so_and_how_to_stop_it(monkeypatch, tmp_path):
    import torch
    from vitboost.bytecode import uncached_bytecode
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pycache"))  # where Python would look: empty
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert uncached_bytecode() is None  # Python writes it this run, the next run reads it
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # PYTHONDONTWRITEBYTECODE, as in many container images
    note = uncached_bytecode()
    assert note.startswith("launch:") and "PYTHONDONTWRITEBYTECODE" in note and "compileall" in note
    cached = Path(importlib.util.cache_from_source(torch.__file__))
    cached.parent.mkdir(parents=True)
    cached.touch()
    assert uncached_bytecode() is None  # installed with its bytecode (pip's default): nothing to say


def test_the_manifest_names_what_a_run_imports_parents_first():
    names = vitboost.bytecode.MANIFEST.read_text().split()
    assert len(names) == len(set(names)) and {"torch", "transformers", "torch._tensor"} <= set(names)
    seen = set()
    for name in names:  # a worker finds a module through its parent package's folders
        parent = name.rpartition(".")[0]
        assert not parent or parent in seen, name
        seen.add(name)


def test_the_command_line_keeps_bytecode_before_anything_loads_torch(monkeypatch):
    # the parser loads torch (bench's flags): a cache set up after it would miss torch's 1,100 modules
    from vitboost import cli
    events = []
    monkeypatch.setattr(vitboost.bytecode, "keep_bytecode", lambda compile_ahead: events.append("keep_bytecode"))
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: events.append("build_parser") or parser())
    monkeypatch.setattr(sys, "argv", ["vitboost", "--help"])
    assert cli._main(None) == 0
    assert events == ["keep_bytecode", "build_parser"]
