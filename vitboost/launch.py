"""`vitboost launch`: torchrun, run from vitboost so that its own process keeps bytecode too.

    vitboost launch --nproc_per_node 2 train --plugin hybrid_parallel --pp_size 2 --dataset data/beans

Everything before the command (train, eval, predict, export, bench) is torchrun's own options, taken as
torchrun takes them; the command runs as `python -m vitboost COMMAND ...` in every rank, as under
`torchrun ... -m vitboost COMMAND ...` (a `-m vitboost` typed out of that habit is dropped). Why: where an
image forbids Python to write bytecode and ships none (bytecode.py), the ranks keep theirs in vitboost's
cache, but torchrun's own process compiled torch's Python in memory at every launch before it started a rank
(BENCHMARKS.md section 32). Here that process reads and
writes the same cache, starts the compile-ahead workers on a machine's first launch, and hands the folder to
its ranks. Elsewhere it is torchrun as it is. A rank that fails ends the launch with the rank's exit code (2
for bad input, whose `error:` line the rank printed) and one line naming the rank, not torchrun's traceback.
"""
from __future__ import annotations

import sys
from typing import NoReturn

COMMANDS = ("train", "eval", "predict", "export", "bench")
USAGE = ("usage: vitboost launch [torchrun options] {" + ",".join(COMMANDS) + "} [command options]\n"
         "  e.g. vitboost launch --nproc_per_node 2 train --plugin torch_ddp --dataset data/beans")


class LaunchError(ValueError):
    """A launch command line without a command to run."""


def split_command(argv: list[str], valued: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(torchrun's options, the vitboost command and its options): the command starts at the first word that
    names one and is not the value of an option in `valued` (`--role train`). A `-m vitboost` before it, from
    the torchrun habit, is dropped: it is what the command runs anyway."""
    for i, word in enumerate(argv):
        if word in COMMANDS and not (i and argv[i - 1] in valued):
            options = argv[:i]
            if options[-2:] in (["-m", "vitboost"], ["--module", "vitboost"]):
                options = options[:-2]
            return options, argv[i:]
    raise LaunchError("vitboost launch needs a command after torchrun's options "
                      f"({', '.join(COMMANDS)}), e.g. `vitboost launch --nproc_per_node 2 train --dataset data/beans`")


def launch(argv: list[str]) -> int:
    """Run torchrun in this process on `-m vitboost COMMAND ...`; the exit code of the first failed rank, 0
    when every rank finished. The caller has already kept bytecode (cli._main, before anything loads torch)."""
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE + "\n\nThe options before the command are torchrun's own (`torchrun --help` lists them).")
        return 0
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    parser = get_args_parser()
    parser.error = _refuse  # one line, not torchrun's 25-line usage
    valued = frozenset(o for a in parser._actions if a.option_strings and a.nargs != 0 for o in a.option_strings)
    options, command = split_command(argv, valued)
    args = parser.parse_args([*options, "-m", "vitboost", *command])
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = (f"was killed by signal {-failure.exitcode}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        print(f"launch: rank {rank} {how} (its output is above)", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as e:  # forwarded to the ranks, which stopped (train: with a checkpoint; they say so)
        print(f"launch: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


def _refuse(message: str) -> NoReturn:
    raise LaunchError(f"vitboost launch: {message} (the options before the command are torchrun's; "
                      "`torchrun --help` lists them)")
