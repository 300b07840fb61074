"""Launch choices of the CUDA kernels (csrc/cuda_plan.h), checked on the CPU: the header is compiled into a
small host program (tests/cuda_plan_test.cpp) by the system C++ compiler."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path_factory.mktemp("plan") / "cuda_plan_test")
    subprocess.run([CXX, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "tests", "cuda_plan_test.cpp"), "-o", exe], check=True)

    def run(*args):
        out = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=True).stdout
        return [int(v) for v in out.split()]

    return run


# The smem variant of mask_plan_kernel has 48 bytes of static shared memory on sm_90 (ptxas; the table in
# benchmarks/results/static-sm90.md). Keys are 4 bytes for fp32/bf16/fp16 noise and 8 for fp64.
@pytest.mark.parametrize("key_bytes,last_fit", [(4, 12276), (8, 6138)])
def test_mask_plan_smem_choice_counts_static_smem(plan, key_bytes, last_fit):
    """Keys plus static smem must fit the 48 KiB default: the old test L * key <= 48 KiB chose the smem
    variant for L up to 12288 (6144 for fp64), whose launch fails with cudaErrorInvalidValue."""
    assert plan("mask_plan", last_fit, key_bytes, 48) == [last_fit * key_bytes]
    assert plan("mask_plan", last_fit + 1, key_bytes, 48) == [0]
    assert plan("mask_plan", 49152 // key_bytes, key_bytes, 48) == [0]
    assert plan("mask_plan", 256, key_bytes, 0) == [256 * key_bytes]
    assert plan("mask_plan", 0, key_bytes, 48) == [0]


def test_vq_tensor_core_smem_fits_the_optin_limit(plan):
    optin = 232448  # sm_90: 227 KiB per block
    dyn, fits = plan("vq_tc", 256, 0, optin)
    assert fits == 1 and dyn <= optin and dyn == plan("vq_tc", 200, 0, optin)[0]  # D padded to 64
    for D in range(1, 2048, 37):
        dyn, fits = plan("vq_tc", D, 0, optin)
        assert fits == (dyn <= optin)
    assert plan("vq_tc", 256, optin, optin)[1] == 0  # static smem counts


@pytest.mark.parametrize("rows,Kp,sms", [(2, 1024, 132), (4, 8192, 132), (1, 128, 132), (400, 8192, 132),
                                         (3, 16384, 78), (1, 65536, 132)])
def test_vq_split_covers_every_code_once(plan, rows, Kp, sms):
    per, splits = plan("split", rows, Kp, 128, sms)
    assert per % 128 == 0 and per >= 128 and 1 <= splits <= 32
    assert (splits - 1) * per < Kp <= splits * per  # every code in exactly one split, none empty
    if rows >= 2 * sms:
        assert splits == 1
    if Kp >= 512 * 8 and rows <= 4:
        assert splits >= 8  # a small batch fills the GPU
