"""CPU thread choice on a busy machine (mage.threads): the decision rule, /proc readings, the re-exec."""

import os
import subprocess
import sys
import time

import pytest
import torch

from mage import threads
from mage.threads import ThreadGovernor


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_decision_uses_the_cores_others_leave_free():
    g = ThreadGovernor()
    g.cpus = [0, 1]  # as on the 2-core development machine
    g.max_threads = 2
    assert g.decide(None) == 2  # no /proc/stat: every core
    assert g.decide(0.0) == 2
    assert g.decide(0.3) == 2  # light background use is ignored
    assert g.decide(0.6) == 1  # a competing process on one core
    assert g.decide(1.0) == 1
    assert g.decide(5.0) == 1  # never fewer than one
    g.cpus, g.max_threads = list(range(8)), 8
    assert g.decide(2.9) == 5


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_a_busy_child_process_is_seen_as_other_load(restore_threads):
    g = ThreadGovernor()
    quiet = g.others(window=0.3)
    assert quiet is not None and quiet >= 0.0
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.2)
        busy = g.others(window=1.0)
    finally:
        child.kill()
        child.wait()
    # The spinning child uses about one core; the machine's other load only adds to it.
    assert busy > 0.6, (quiet, busy)
    assert g.decide(busy) <= max(1, len(g.cpus) - 1)


def test_update_sets_torch_threads_and_records_history(restore_threads):
    g = ThreadGovernor(max_threads=1, interval=3600)
    assert g.update(force=True, window=0.1) == 1 and torch.get_num_threads() == 1
    assert len(g.history) == 1
    assert g.update() == 1 and len(g.history) == 1  # within the interval: no new decision


def test_busy_tick_parsing_counts_everything_but_idle(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 1 2 3 100 50 4 5 6 0 0\ncpu1 10 20 30 400 0 40 50 60 0 0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(stat if p == "/proc/stat" else p, *a, **k))
    assert threads._busy_ticks([0]) == 1 + 2 + 3 + 4 + 5 + 6
    assert threads._busy_ticks([0, 1]) == 21 + 210
    # Niced programs' time (the second column) left out: they yield the core to a nice-0 process.
    assert threads._busy_ticks([0], count_niced=False) == 1 + 3 + 4 + 5 + 6


def test_niced_programs_yield_only_without_autogroup(tmp_path, monkeypatch):
    # With autogroup on, nice orders processes only within a session: a niced build from another terminal
    # takes a full share of a core, so it must count as busy.
    flag = tmp_path / "sched_autogroup_enabled"
    monkeypatch.setattr(threads, "_own_niceness", lambda: 0)
    flag.write_text("1\n")
    assert not threads._niced_programs_yield(str(flag))
    flag.write_text("0\n")
    assert threads._niced_programs_yield(str(flag))
    assert threads._niced_programs_yield(str(tmp_path / "absent"))  # a kernel without autogroup
    monkeypatch.setattr(threads, "_own_niceness", lambda: 10)  # niced ourselves: niced programs are our equals
    assert not threads._niced_programs_yield(str(flag))


def test_passive_wait_is_set_by_re_executing_the_command(tmp_path):
    script = tmp_path / "probe.py"
    # Loads mage/threads.py alone (it imports no torch at module level), so the three starts stay cheap.
    script.write_text("import importlib.util, os, sys\n"
                      "spec = importlib.util.spec_from_file_location('threads', sys.argv[1])\n"
                      "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\n"
                      "print('before', os.getpid(), flush=True)\nmod.ensure_passive_wait()\n"
                      "print('after', os.getpid(), os.environ.get('OMP_WAIT_POLICY'),\n"
                      "      os.environ.get('GOMP_SPINCOUNT'))\n")
    path = threads.__file__
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MAGE_THREADS_REEXEC")}
    out = subprocess.run([sys.executable, str(script), path], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    # Re-executed once (same pid, "before" printed twice), then running with PASSIVE.
    assert [line.split()[0] for line in out if line] == ["before", "before", "after"]
    assert out[2].split()[1] == out[0].split()[1] and out[2].split()[2:] == ["PASSIVE", "20000"]
    # A user's own setting is kept: no re-exec.
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, str(script), path], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out.count("before") == 1 and out[-2:] == ["ACTIVE", "None"]
