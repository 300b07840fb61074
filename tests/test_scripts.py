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
