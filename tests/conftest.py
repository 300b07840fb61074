"""Shared test settings: Triton runs under its interpreter when there is no GPU,
devices always include CPU, and tolerances live in one table keyed by dtype."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit runs: before kernel imports

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (rtol, atol) for comparing results computed in a dtype against a higher-precision reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (1e-3, 1e-4),
}

@pytest.fixture
def one_thread():
    """Tiny models: on a shared machine a second thread mostly waits for a busy core. Modules that want it
    say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def on_threads():
    """`on_threads(fn, *counts)`: [fn() under each torch thread count], counts (1, 2) by default; the test's
    thread count is restored after it, whatever fails."""
    threads = torch.get_num_threads()

    def run(fn, *counts):
        results = []
        for n in counts or (1, 2):
            torch.set_num_threads(n)
            results.append(fn())
        return results

    yield run
    torch.set_num_threads(threads)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(not has_triton(), reason="triton is not installed")
# Triton runs kernels on CPU tensors only under its interpreter (set above when there is no GPU); on a GPU
# machine the tests that hand it CPU tensors skip, and the CUDA tests cover the kernels there.
requires_triton_on_cpu = pytest.mark.skipif(
    not has_triton() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs Triton kernels on CPU tensors, which needs TRITON_INTERPRET=1 (set when there is no GPU)",
)


def assert_close(actual, expected, dtype=None, **kwargs):
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kwargs)
