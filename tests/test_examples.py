"""The scripts in examples/ run at their (small) default sizes and do what they say."""

import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
pytestmark = pytest.mark.usefixtures("one_thread")


def run_example(name: str, *args: str):
    """Run examples/<name> as a script (argv as given) and return what its main() returned."""
    module = runpy.run_path(os.path.join(ROOT, "examples", name), run_name="example")
    return module["main"](list(args))


def test_every_example_is_tested():
    tested = {"vector_quantize.py", "sample.py", "inpaint.py", "train.py", "linear_probe.py"}
    assert set(EXAMPLES) == tested


def test_vector_quantize():
    assert run_example("vector_quantize.py") < 0.05  # down to the data's noise (variance 0.01)


def test_sample(tmp_path):
    images = run_example("sample.py", "--out", str(tmp_path), "--num", "4")
    assert images.shape == (4, 3, 32, 32) and (tmp_path / "samples.png").is_file()


def test_inpaint(tmp_path):
    filled = run_example("inpaint.py", "--out", str(tmp_path), "--steps", "4")
    assert filled.shape == (2, 3, 32, 32) and (tmp_path / "inpaint.png").is_file()


def test_train_then_probe(tmp_path):
    losses = run_example("train.py", "--out", str(tmp_path))
    assert len(losses) == 20 and losses[-1] < losses[0]
    results = run_example("linear_probe.py", "--epochs", "3", "--checkpoint", str(tmp_path / "mage-digits"))
    assert set(results) == {"MAGE features", "raw pixels"} and results["raw pixels"] > 0.8


def test_scripts_run_from_the_command_line(tmp_path):
    """One real `python examples/...` run, as a user types it (the others run in-process to save time)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")])}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "sample.py"), "--num", "2", "--steps", "2",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout
