"""The CI scripts' argument handling, run with stand-ins for the heavy tools (no venv, no build)."""

import os
import shutil
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _executable(path, text):
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def test_cuda_compile_check_hands_cmake_an_absolute_venv_python(tmp_path):
    """A relative MAGE_CUDA_VENV (the default `.venv-cu` is one) reached CMake as a relative Python_EXECUTABLE,
    which FindPython ignores: it took whatever Python came first on PATH (a CPU torch), and the check failed."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(ROOT, "scripts", "cuda_compile_check.sh"), tmp_path / "scripts")
    (tmp_path / "venvs" / "cu" / "bin").mkdir(parents=True)
    _executable(tmp_path / "venvs" / "cu" / "bin" / "python", "exit 0\n")  # its pip install: a no-op
    (tmp_path / "tools").mkdir()
    # The stand-in cmake records its arguments and stops the script at its first call.
    _executable(tmp_path / "tools" / "cmake", f'printf "%s\\n" "$@" > "{tmp_path}/cmake-args"; exit 3\n')
    env = dict(os.environ, MAGE_CUDA_VENV="venvs/cu", PATH=f"{tmp_path / 'tools'}:{os.environ['PATH']}")
    run = subprocess.run(["bash", str(tmp_path / "scripts" / "cuda_compile_check.sh")], cwd=tmp_path / "tools",
                         env=env, capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    args = (tmp_path / "cmake-args").read_text().splitlines()
    assert f"-DPython_EXECUTABLE={tmp_path}/venvs/cu/bin/python" in args, args


def _gpu_check(tmp_path, **env):
    """scripts/gpu_check.sh (the GPU mode) with stand-ins: a python that sleeps a second per call, a cmake that
    does nothing, no GPU tools. Returns (exit status, summary lines, names in logs.tar.gz)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(ROOT, "scripts", "gpu_check.sh"), tmp_path / "scripts")
    (tmp_path / "tools").mkdir()
    _executable(tmp_path / "tools" / "python", "sleep 1\n")
    _executable(tmp_path / "tools" / "cmake", "exit 0\n")
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         env=dict(os.environ, OUT=str(out), PYTHON=str(tmp_path / "tools" / "python"),
                                  PATH=f"{tmp_path / 'tools'}:/usr/bin:/bin", **env))
    logs = subprocess.run(["tar", "tzf", str(out / "logs.tar.gz")], capture_output=True, text=True).stdout
    return run.returncode, (out / "summary.txt").read_text().splitlines(), logs.split()


def test_gpu_check_stops_starting_stages_when_its_budget_is_spent(tmp_path):
    """The lent GPU is there for minutes: stages that would start with under 20 s of GPU_CHECK_BUDGET left are
    skipped and listed, the logs of the stages that ran are already under $OUT, and the run says it failed."""
    status, summary, logs = _gpu_check(tmp_path, GPU_CHECK_BUDGET="23")
    ran = [line.split()[0] for line in summary if " ok " in line]
    skipped = [line.split()[0] for line in summary if "skipped: budget spent" in line]
    assert ran[:3] == ["env", "build", "build_info"] and skipped[-1] == "bench_training", summary
    assert "missing output: ops.csv" in summary and status == 1
    assert {f"./{name}.log" for name in ran} <= set(logs), logs


def test_gpu_check_runs_only_the_stages_asked_for(tmp_path):
    status, summary, _ = _gpu_check(tmp_path, GPU_CHECK_ONLY="build_info ops_re")
    assert [line.split()[0] for line in summary] == ["build", "build_info", "ops_remask"], summary
    assert status == 0
