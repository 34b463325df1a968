"""CPU kernels that read the packed ``kgroup8`` weights in place (``cpu_packed.cpp``, AVX2 + FMA; for M > 1 a
512-bit ``vpdpbusd`` tile where the machine has AVX-512 VNNI, and AMX-INT8 ``tdpbusd`` tiles where it also has AMX,
see ``avx512_flags`` / ``isa``), as torch ops.

``int_mm(xq, w)``: exact ``xq[M, K] @ q[N, K]^T`` in int32 from the 2/4/8-bit codes (0.25 / 0.5 / 1 byte per
weight in memory, no int8 copy). Followed by ``kernels.reference.epilogue`` it is bitwise the reference linear.
``float_mm(x, w)``: ``f32(x) @ q^T`` with f32 FMA accumulation (the weight-only lm_head); its summation order is
not the reference's bf16 GEMM (which also rounds its output to bf16), see ``float_mm``'s docstring for the bound.

Built once per machine with torch's C++ extension builder (ninja, g++; pinned through the lock) into
``$GEMMA_MOBILE_CACHE/torch_ext`` (default ``~/.cache/vllm-gemma-mobile/torch_ext``); later loads reuse the
build (torch rebuilds when the source or flags change). ``make ext`` builds it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from .layout import PackedWeight

logger = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("cpu_packed.cpp")
_SOURCES = [_SRC, Path(__file__).with_name("cpu_kv.cpp")]  # one extension: packed GEMMs + quantized KV cache
_NAME = "gemma_mobile_cpu_packed"
AMX_ENV = "GEMMA_MOBILE_AMX"  # "0": the 512-bit path also where AMX is available (comparison, see isa / set_amx)
PREFETCH_ENV = "GEMMA_MOBILE_PREFETCH_TILES"  # software prefetch distance in 4-row tiles (default 4, 0: off)
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17", "-ffp-contract=off"]  # no implicit FMA: exact epilogue


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def avx512_flags(flags: set[str] | None = None) -> list[str]:
    """Compiler flags of the 512-bit VNNI integer path for M > 1 (GM_ZMM in cpu_packed.cpp) on a build machine with
    AVX-512 F / BW / VNNI; [] elsewhere or with GEMMA_MOBILE_AVX512=0 (the AVX2 path: bitwise the same integers).
    The extension is built on the machine that runs it; torch rebuilds it when these flags change."""
    f = cpu_flags() if flags is None else flags
    if os.environ.get("GEMMA_MOBILE_AVX512", "1").strip() == "0":
        return []
    if not {"avx512f", "avx512bw", "avx512_vnni"} <= f:
        return []
    # AMX-INT8 tiles for M >= 12 (GM_AMX), where the build machine has them; used only if the kernel grants this
    # process the tile state at run time, else the 512-bit path runs (GEMMA_MOBILE_AMX=0 switches AMX off at load)
    amx = ["-mamx-tile", "-mamx-int8"] if {"amx_tile", "amx_int8"} <= f else []
    return ["-mavx512f", "-mavx512bw", "-mavx512vnni"] + amx


_LOCK = threading.Lock()
_STATUS: tuple[bool, str] | None = None


def build_dir() -> Path:
    root = os.environ.get("GEMMA_MOBILE_CACHE") or os.path.expanduser("~/.cache/vllm-gemma-mobile")
    return Path(root) / "torch_ext" / _NAME


def _cpu_has_avx2() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap in ("AVX2", "AVX512")


def status() -> tuple[bool, str]:
    """(usable, why not): builds / loads the extension on first call (thread-safe); raises only for a malformed
    GEMMA_MOBILE_PREFETCH_TILES."""
    global _STATUS
    with _LOCK:
        if _STATUS is not None:
            return _STATUS
        if not _cpu_has_avx2():
            _STATUS = (False, f"CPU capability {torch.backends.cpu.get_cpu_capability()} lacks AVX2")
            return _STATUS
        if hasattr(torch.ops, "gemma_mobile") and hasattr(torch.ops.gemma_mobile, "kv_paged_attention"):
            _STATUS = (True, "")
            return _STATUS
        pf = os.environ.get(PREFETCH_ENV, "").strip()
        if pf and not pf.isdigit():  # a bad switch is the user's error, not a reason to run without the kernels
            raise ValueError(f"{PREFETCH_ENV}={pf!r}: expected a number of tiles >= 0")
        try:
            from torch.utils import cpp_extension

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=_NAME, sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS + avx512_flags(),
                               extra_ldflags=["-fopenmp"],
                               build_directory=str(d), is_python_module=False, verbose=False)
            _register_fakes()
            if os.environ.get(AMX_ENV, "1").strip() == "0":
                torch.ops.gemma_mobile.packed_amx(0)
            if pf:
                torch.ops.gemma_mobile.packed_prefetch(int(pf))
            _STATUS = (True, "")
        except Exception as e:  # a missing compiler must not break import; the caller logs the reason
            _STATUS = (False, f"building {'/'.join(p.name for p in _SOURCES)} failed ({type(e).__name__}: {str(e)[:300]})")
        return _STATUS


def available() -> bool:
    return status()[0]


def _register_fakes() -> None:
    """Shape functions, so the ops trace under torch.compile (vLLM compiles the CPU model)."""

    @torch.library.register_fake("gemma_mobile::packed_int_mm")
    def _(xq, packed, bits, k):
        return xq.new_empty((xq.shape[0], packed.shape[0]), dtype=torch.int32)

    @torch.library.register_fake("gemma_mobile::packed_float_mm")
    def _(x, packed, bits, k):
        return x.new_empty((x.shape[0], packed.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("gemma_mobile::packed_linear")
    def _(x, packed, bits, k, col_scale, input_scale, bias, output_scale, out_dtype):
        return x.new_empty((x.shape[0], packed.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("gemma_mobile::kv_write")
    def _(cache, key, value, slot_mapping, k_scale, v_scale, bits):
        return None

    @torch.library.register_fake("gemma_mobile::kv_paged_attention")
    def _(query, cache, query_start_loc, seq_lens, block_table, k_scale, v_scale, bits, scale, window, softcap,
          causal, out):
        return None


def require() -> None:
    if _STATUS is not None and _STATUS[0]:  # lock-free once loaded (also what torch.compile traces through)
        return
    ok, why = status()
    if not ok:
        raise RuntimeError(f"gemma_mobile packed CPU kernels unavailable: {why}")


def isa() -> str:
    """The integer path the loaded build runs for M > 1: "amx-int8" (tdpbusd tiles for M >= 12, the 512-bit tile
    below), "avx512-vnni" (512-bit vpdpbusd tile) or "avx2"."""
    require()
    if torch.ops.gemma_mobile.packed_amx(-1):
        return "amx-int8"
    return "avx512-vnni" if torch.ops.gemma_mobile.packed_zmm() else "avx2"


def set_amx(on: bool) -> bool:
    """Switch the AMX path (M >= 12) on / off in this process (tests and benchmarks compare the paths; all give
    the same integers). Returns whether it now runs (False where the build or the CPU has no AMX)."""
    require()
    return bool(torch.ops.gemma_mobile.packed_amx(1 if on else 0))


def set_prefetch(tiles: int) -> int:
    """Software prefetch distance, in 4-row tiles, of the M == 1 and the M > 1 (512-bit) loops (0: off; default 4).
    Numerics do not depend on it. Measured on the 270M (Zen 5 VM): one decode step's matmuls, each layer's own
    weights, cold cache, 40 interleaved passes, M = 1: median 7.39 ms off vs 5.42 ms at 4 tiles (2..12 within 4 %);
    in one engine, alternating (docs/results/cpu-2026-12-02): decode +29 % at 1 stream, +22 % at 4, +14 % at 16.
    Returns the value set."""
    require()
    if tiles < 0:
        raise ValueError(f"prefetch distance must be >= 0 tiles, got {tiles}")
    return int(torch.ops.gemma_mobile.packed_prefetch(tiles))


def int_mm(xq: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Exact int32 ``xq[M, K] @ q[N, K]^T`` (xq int8, CPU) read from ``w.packed``."""
    require()
    return torch.ops.gemma_mobile.packed_int_mm(xq, w.packed, w.bits, w.k)


def float_mm(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """``f32(x)[M, K] @ q[N, K]^T`` in f32 (8-lane FMA partial sums, then a lane sum). Every product
    x*q is exact in f32 (|q| <= 128, 8 significant bits); only the additions round, so
    |result - exact| <= K * 2^-24 * sum_k |x_k q_k| (standard recursive-summation bound)."""
    require()
    return torch.ops.gemma_mobile.packed_float_mm(x.to(torch.float32), w.packed, w.bits, w.k)


def linear(x: torch.Tensor, w: PackedWeight, col_scale: torch.Tensor, input_scale: torch.Tensor | None,
           bias: torch.Tensor | None, output_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The whole linear in one call (input quant, packed GEMM, f32 epilogue, static requant, cast), bitwise
    ``kernels.reference.linear`` for int8 activations (``input_scale``; ``col_scale = f32(input_scale *
    weight_scale)``, ``input_scale`` f32 [1]); ``input_scale=None``: the weight-only path (``col_scale = weight_scale``;
    the f32 product ``float_mm`` is rounded to x's dtype before the scale, like the reference's GEMM in x's dtype). ``x [M, K]`` float; ``out_dtype`` float or int8 (the output codes)."""
    require()
    return torch.ops.gemma_mobile.packed_linear(x, w.packed, w.bits, w.k, col_scale, input_scale, bias,
                                                 output_scale, out_dtype)


def main() -> None:
    """Build (or load) once and say where (`make ext`)."""
    logging.basicConfig(level=logging.INFO)
    ok, why = status()
    print(f"{_NAME}: {'built/loaded at ' + str(build_dir()) if ok else 'NOT available: ' + why}")
