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
    "detected": the path auto takes on this CPU, "avx512_bf16_loops": whether the masking ops' bf16 adds take
    AVX-512 BF16 now (None if MAGE_CPU_ISA is unusable)}; all None without the native library."""
    lib = _lib()
    if lib is None:
        return {"path": None, "detected": None, "avx512_bf16_loops": None}
    loops = lib.mage_cpu_avx512_bf16_loops()
    return {"path": lib.mage_cpu_isa().decode(), "detected": lib.mage_cpu_isa_detected().decode(),
            "avx512_bf16_loops": None if loops < 0 else bool(loops)}


def check_cpu_isa() -> None:
    """MAGE_CPU_ISA names a path this CPU runs (the C++ kernels check it at each call; the `mage` command checks it
    first, so the error is a one-line user error there)."""
    import os

    from ._checks import InputValueError

    if cpu_isa()["path"] != "invalid":
        return
    name = os.environ.get("MAGE_CPU_ISA", "")
    if name != "avx2":
        raise InputValueError(f"MAGE_CPU_ISA must be one of auto, scalar, avx2, avx512_bf16, got {name!r}")
    raise InputValueError("MAGE_CPU_ISA=avx2 asks for AVX2/FMA kernels, but this CPU lacks AVX2 or FMA; unset "
                          "MAGE_CPU_ISA or set it to scalar")
