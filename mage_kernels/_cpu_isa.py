"""Which instruction-set path the C++ CPU kernels take (see csrc/cpu_isa.h and docs/OPS.md).

`MAGE_CPU_ISA=scalar|avx2|avx512_bf16|auto` forces a path; it is read on every call.
"""

from __future__ import annotations

import ctypes
import functools

from ._registry import NATIVE_PATH


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if NATIVE_PATH is None:
        return None
    lib = ctypes.CDLL(NATIVE_PATH)  # the library torch already loaded: same handle
    for name in ("mage_cpu_isa", "mage_cpu_isa_detected"):
        getattr(lib, name).restype = ctypes.c_char_p
    return lib


def cpu_isa() -> dict:
    """{"path": the path a CPU kernel call takes now ("invalid" if MAGE_CPU_ISA is unusable),
    "detected": the best path this CPU supports}; both None without the native library."""
    lib = _lib()
    if lib is None:
        return {"path": None, "detected": None}
    return {"path": lib.mage_cpu_isa().decode(), "detected": lib.mage_cpu_isa_detected().decode()}
