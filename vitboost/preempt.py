"""Preemption: SIGTERM (what SLURM and Kubernetes send first) or SIGUSR1 (SLURM's ``--signal``
warning) ends a run cleanly instead of at once: every rank finishes its step, a checkpoint is
written, and the process exits with a line saying how to resume.

One process checks a Python flag after every step: no device sync, no collective. Several ranks
must stop at the same step and a signal reaches them at slightly different times, so they agree
every ``every`` steps (the logging cadence, where the loop syncs anyway) with one tiny all_reduce
(MAX) of the flag on the CPU (gloo) backend: a signal stops the run at the next multiple of
``every``. A second signal acts as it would without vitboost (SIGTERM kills at once).
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint. str(e) says how to resume (empty on
    ranks > 0, so the line is printed once); the exit code is 128 + the signal, as a shell reports a kill."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Preemption:
    """Installs the handlers (main thread only) and answers ``should_stop(step)`` after each step."""

    def __init__(self, every: int = 1):
        global _active
        restore_signals()
        # received: written only by the handler; signum: what the ranks agreed on (read by exit()). Two
        # fields, so a signal handled while should_stop waits in its all_reduce is not overwritten by
        # the result of a reduction that started before it.
        self.every, self.received, self.signum, self.stopped = max(1, every), 0, 0, False
        self._multi = dist.is_initialized() and dist.get_world_size() > 1
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) or signal.SIG_DFL for s in SIGNALS}
        _active = self

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts as before

    def should_stop(self, step: int) -> bool:
        """After each step: True when the run must stop now; the same step on every rank."""
        if not self._multi:
            self.signum = self.received
        elif step % self.every == 0:
            flag = torch.tensor([self.received], dtype=torch.int32)  # CPU: gloo, also beside nccl
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag)
        self.stopped = self.signum != 0
        return self.stopped

    def exit(self, step: int, checkpoint, is_main: bool) -> Preempted:
        name = signal.Signals(self.signum).name
        return Preempted(f"stopped by {name} after step {step}; checkpoint {checkpoint} written: continue with the "
                         f"same command and --resume auto" if is_main else "", self.signum)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


_active: Preemption | None = None


def restore_signals() -> None:
    """Put back the handlers the last Preemption replaced (end of a run, whatever happened)."""
    global _active
    if _active is not None:
        _active.restore()
        _active = None
