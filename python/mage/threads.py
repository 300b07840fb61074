"""CPU threads on a machine that may be busy with other work.

torch runs every CPU op on one OpenMP thread per core. Each parallel region ends when its slowest thread
does, so one core shared with another program slows every region down, and OpenMP's default of
spin-waiting at the end of a region burns the shared core the late thread needs: measured on 2 cores
with one competing process, a small MAGE training step went from 0.25 s to 5 s. Two remedies:

- `OMP_WAIT_POLICY=PASSIVE`: idle OpenMP threads sleep instead of spinning. OpenMP reads it once, when
  torch loads, so it must be in the environment before `import torch`; `ensure_passive_wait` re-executes
  the command with it set (`mage demo` and `mage train` call it first), along with a short bounded spin
  (`GOMP_SPINCOUNT`) before sleeping.
- `ThreadGovernor`: uses only the cores other programs leave free, measured from /proc/stat over the
  last few seconds (our own CPU time subtracted), and re-checks while training runs.
"""

from __future__ import annotations

import math
import os
import sys
import time

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
# GNU OpenMP (torch's on Linux) spins this many times before it sleeps; set, it overrides PASSIVE's 0. A
# short spin (tens of microseconds) keeps a quiet machine's threads from sleeping between the many small
# parallel regions of a small model: a demo MAGE step took about 10% less time beside niced background
# jobs (docs/TRAINING.md), while a core shared with an equal-priority program still gets it back quickly.
SPIN_ENV, SPIN_COUNT = "GOMP_SPINCOUNT", "20000"
_REEXEC_MARK = "MAGE_THREADS_REEXEC"


def ensure_passive_wait() -> None:
    """Re-execute this command with OMP_WAIT_POLICY=PASSIVE unless the variable is already set (a user's own
    choice is kept). It replaces the process (same pid), so call it before doing anything else."""
    if WAIT_POLICY_ENV in os.environ or os.environ.get(_REEXEC_MARK) or not getattr(sys, "orig_argv", None):
        return
    env = {**os.environ, WAIT_POLICY_ENV: "PASSIVE", _REEXEC_MARK: "1"}
    env.setdefault(SPIN_ENV, SPIN_COUNT)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # keep running with OpenMP's default policy rather than fail


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _own_niceness() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return 0


def _niced_programs_yield(autogroup_path: str = "/proc/sys/kernel/sched_autogroup_enabled") -> bool:
    """Whether programs with a positive nice value give their core to us. Only when we are not niced
    ourselves and the kernel's autogroup scheduling is off: with it on (most desktop kernels), the scheduler
    first shares the CPU equally between sessions, and nice orders processes only within one session, so a
    niced build started from another terminal still takes a full share."""
    if _own_niceness() > 0:
        return False
    try:
        with open(autogroup_path) as f:
            return f.read().strip() == "0"
    except OSError:  # no autogroup in this kernel: nice applies between all processes
        return True


def _busy_ticks(cpus: list[int], count_niced: bool = True) -> int | None:
    """Non-idle clock ticks of the given CPUs since boot (all processes), or None without /proc/stat.

    count_niced=False leaves out the time of processes with a positive nice value: when we run at nice 0
    they get a small share of a core we want (about 1.5% at nice 19), so a niced background build is not
    a reason to drop a thread."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{i}" for i in cpus}
    total = 0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in wanted:
            # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy
            v = [int(x) for x in parts[1:9]]
            total += v[0] + (v[1] if count_niced else 0) + v[2] + v[5] + v[6] + v[7]
    return total


def _own_ticks() -> int | None:
    """CPU clock ticks used by this process (all its threads) and its waited-for children."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15])  # utime stime cutime cstime


class ThreadGovernor:
    """Chooses torch's thread count from the cores other processes leave free.

    threads = cores - ceil(others - slack), clamped to [1, max_threads], where `others` is the CPU time of
    every other process over the last window, in cores. A competing process using most of one core of
    two gives 1 thread (the free core runs at full speed, where 2 threads would wait on the shared one);
    background use below `slack` cores is ignored, and so are processes at a lower priority than ours
    (a positive nice value while we run at nice 0 or below) where the scheduler gives their core to us
    (autogroup scheduling off, see `_niced_programs_yield`).
    `update()` is cheap (two small /proc reads) and re-decides at most every `interval` seconds.
    """

    def __init__(self, max_threads: int | None = None, interval: float = 5.0, slack: float = 0.35):
        self.cpus = _cpus()
        if max_threads is None:  # one share of the cores per local process (torchrun sets LOCAL_WORLD_SIZE)
            max_threads = len(self.cpus) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.max_threads = max(1, min(max_threads, len(self.cpus)))
        self.interval, self.slack = interval, slack
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.history: list[tuple[float, int, float]] = []  # (elapsed s, threads, other cores)
        self._t0 = time.monotonic()
        self.count_niced = not _niced_programs_yield()
        self._mark = self._sample()
        self.threads = self.max_threads

    def _sample(self) -> tuple[float, int | None, int | None]:
        return time.monotonic(), _busy_ticks(self.cpus, self.count_niced), _own_ticks()

    def others(self, window: float = 0.0) -> float | None:
        """Cores used by other processes since the last decision (or over `window` seconds from now)."""
        if window:
            self._mark = self._sample()
            time.sleep(window)
        now = self._sample()
        (t0, b0, o0), (t1, b1, o1) = self._mark, now
        if None in (b0, o0, b1, o1) or t1 - t0 < 0.05:
            return None
        return max(0.0, ((b1 - b0) - (o1 - o0)) / self.hz / (t1 - t0))

    def decide(self, others: float | None) -> int:
        if others is None:
            return self.max_threads
        free = len(self.cpus) - max(0, math.ceil(others - self.slack))
        return max(1, min(self.max_threads, free))

    def update(self, force: bool = False, window: float = 0.0) -> int:
        """Re-decide if `interval` seconds have passed (or `force`); sets torch's threads; returns them."""
        if not force and time.monotonic() - self._mark[0] < self.interval:
            return self.threads
        import torch

        others = self.others(window)
        self.threads = self.decide(others)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        self.history.append((round(time.monotonic() - self._t0, 1), self.threads,
                             round(others, 2) if others is not None else -1.0))
        self._mark = self._sample()
        return self.threads
