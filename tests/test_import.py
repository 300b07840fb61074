"""`import mage_kernels` from a source checkout without a built library (issue 11 item 14): the warning says
that the source tree shadows the installed package and what to do, not "build it" (the user just did)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mage_kernels


def test_import_from_the_source_tree_says_why_the_library_is_missing(tmp_path):
    package = Path(mage_kernels.__file__).parent
    shutil.copytree(package, tmp_path / "mage_kernels", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'mage-kernels'\n")
    (tmp_path / "csrc").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAGE_KERNELS_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", "import mage_kernels; print(mage_kernels.build_info()['native'])"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"
    assert "imported the source tree" in proc.stderr and "Run from another directory" in proc.stderr
    assert "pip install -e . --no-build-isolation" in proc.stderr
