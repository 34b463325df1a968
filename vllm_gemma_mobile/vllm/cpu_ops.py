"""CPU compute path of the plugin: vLLM's own CPU kernels, no per-call dequantization.

* Quantized linears (wNa8o8): the signed weight codes are held as int8 inside a oneDNN int8 GEMM handle
  (`create_onednn_scaled_mm`, the kernel behind vLLM's `CPUInt8ScaledMMLinearKernel`, AMX/VNNI), the input is
  quantized with vLLM's `static_scaled_int8_quant` (x * (1/s_x) in f32, round-half-to-even, saturating to
  [-128, 127] — checked in tests), the GEMM accumulates in int32 and its f32 epilogue returns
  `acc * s_x * (weight_scale[n] / s_y)`; `static_scaled_int8_quant` with scale 1 rounds/clamps that to the
  output codes, which are multiplied by s_y (f32) and cast to the activation dtype.
* Weight-only tied embedding / lm_head: the 2/4-bit codes are held once, in the blocked uint4b8 layout of
  vLLM's `cpu_gemm_wna16` (channel-wise: one group spanning K, bf16 scales); the lm_head GEMM reads it
  directly and `gather_rows` pulls embedding rows out of the same buffer.

Float rounding vs the contract: the integer products are exact; the f32 quotients x/s_x and y/s_y are
formed as products with reciprocals / folded scales, so they can differ from IEEE division by a few ulp,
which flips a rounded int8 value only when the quotient lies within ~1e-7 relative of a .5 boundary
(0 flips seen in 1M bf16 inputs; the bf16 reference itself rounds at ~4e-3). The lm_head multiplies by bf16
copies of the scales (exactly the reference's bf16 dequantized weights for |q| in {0, 1, 2, 4, 8}) and the
AMX kernel accumulates in f32 over bf16 products.
"""

from __future__ import annotations

import torch

from kernels import bitpack


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """compressed-tensors `pack_to_int32` along K (offset binary, low bits first) -> signed int8 [N, k], on
    `packed`'s device (delegates to `kernels.bitpack.ct_unpack`)."""
    if bits not in bitpack.SUPPORTED_BITS:
        raise ValueError(f"unsupported weight bits {bits}: expected 2, 4 or 8")
    return bitpack.ct_unpack(packed.to(torch.int32), bits, k)


_CPU_KERNELS: tuple[bool, str] | None = None


def cpu_kernels_status() -> tuple[bool, str]:
    """(usable, why) for vLLM's CPU kernels this path needs: the WNA16 GEMM (`cpu_gemm_wna16`) and an EXACT
    oneDNN int8 GEMM. vLLM's AVX2 build (`_C_AVX2`) has no `cpu_gemm_wna16`, and oneDNN's s8 x s8 GEMM without
    AVX-512 VNNI / AMX saturates int16 intermediates (measured 17-39% relative error on an AMD EPYC, AVX2), so
    exactness is probed once on a small GEMM against `torch._int_mm` instead of trusting CPU flags."""
    global _CPU_KERNELS
    if _CPU_KERNELS is not None:
        return _CPU_KERNELS
    try:
        import vllm._custom_ops as ops

        if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
            _CPU_KERNELS = (False, f"vLLM's CPU build ({torch.backends.cpu.get_cpu_capability()}) has no "
                                   "cpu_gemm_wna16 kernel")
        elif not bool(ops._supports_onednn):
            _CPU_KERNELS = (False, "vLLM was built without oneDNN")
        else:
            g = torch.Generator().manual_seed(0)
            codes = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=g)
            x = torch.randint(-128, 128, (4, 256), dtype=torch.int8, generator=g)
            gemm = OneDNNInt8GEMM(codes, torch.ones(64), 1.0)
            exact = torch._int_mm(torch.cat([x, x, x, x, x]), codes.t())[:4].to(torch.float32)
            if torch.equal(gemm(x), exact):
                _CPU_KERNELS = (True, "")
            else:
                _CPU_KERNELS = (False, "oneDNN's int8 GEMM is not exact on this CPU (no AVX-512 VNNI / AMX)")
    except Exception as e:  # pragma: no cover - non-CPU builds
        _CPU_KERNELS = (False, f"vLLM's CPU kernels are unavailable ({type(e).__name__}: {e})")
    return _CPU_KERNELS


def have_cpu_kernels() -> bool:
    """True when vLLM's CPU extension provides an exact oneDNN int8 GEMM and the WNA16 GEMM."""
    return cpu_kernels_status()[0]


class OneDNNInt8GEMM:
    """`y = (q_x @ q_w^T) * (s_x * weight_scale)` in float32, q_x = static int8 quantization of x."""

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, input_scale: float):
        import vllm._custom_ops as ops

        self.n, self.k = codes.shape
        self.input_scale = torch.tensor([input_scale], dtype=torch.float32)
        # The handle prepacks the [K, N] int8 weight into its own blocked layout (the codes tensor may be
        # freed) but keeps a POINTER to the weight scales: they must stay alive as long as the handle.
        self.weight_scale = weight_scale.reshape(-1, 1).to(torch.float32).contiguous()
        self.handle = ops.create_onednn_scaled_mm(codes.t(), self.weight_scale, torch.float32, False, False, 32)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.int8)
        torch.ops._C.static_scaled_int8_quant(out, x, self.input_scale, None)
        return out

    def __call__(self, x_q: torch.Tensor) -> torch.Tensor:
        import vllm._custom_ops as ops

        out = torch.empty((x_q.shape[0], self.n), dtype=torch.float32)
        ops.onednn_scaled_mm(self.handle, x_q, out, self.input_scale, None, None, None)
        return out


def requant_int8(y: torch.Tensor, output_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`clamp(round_half_even(y / s_y), -128, 127) * s_y` in float32 (in place on y), then cast."""
    return y.div_(output_scale).round_().clamp_(-128.0, 127.0).mul_(output_scale).to(out_dtype)


_ONE = torch.ones(1, dtype=torch.float32)


def requant_scaled_int8(z: torch.Tensor, output_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """z = y / s_y already (folded into the GEMM): `clamp(round_half_even(z), -128, 127) * s_y`, then cast."""
    q = torch.empty(z.shape, dtype=torch.int8)
    torch.ops._C.static_scaled_int8_quant(q, z, _ONE, None)
    return torch.mul(q, output_scale).to(out_dtype)


# ---------------------------------------------------------------- weight-only table (embedding + lm_head)

WNA16_BLOCK_N = 16  # cpu_gemm_wna16: 16 output channels per block, 8 uint4 codes per int32


def to_wna16_table(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes [N, K] (|q| <= 8) -> cpu_gemm_wna16's blocked uint4b8 layout [N/16, K*2] int32.

    Layout: block b holds channels 16b..16b+15; word (k, h) packs channels 16b+8h+j at bits 4j (code+8).
    """
    n, k = codes.shape
    if n % 32 or k % 32:
        raise ValueError(f"cpu_gemm_wna16 needs N and K multiples of 32, got N={n}, K={k}")
    u = (codes.to(torch.int32) + 8).t().contiguous()  # [K, N] uint4b8
    u = u.view(k, n // 8, 8)
    words = torch.zeros((k, n // 8), dtype=torch.int32)
    for j in range(8):  # disjoint bit fields; bit 31 wraps into the sign as in the kernel's int32 view
        words |= u[:, :, j] << (4 * j)
    return words.view(k, n // WNA16_BLOCK_N, 2).permute(1, 0, 2).reshape(n // WNA16_BLOCK_N, k * 2).contiguous()


def gather_rows(table: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Signed codes of rows `ids` from the blocked table -> int32 [len(ids), k]."""
    words = table.index_select(0, ids // WNA16_BLOCK_N).view(-1, k, 2)
    j = ids % WNA16_BLOCK_N
    w = torch.gather(words, 2, (j // 8).view(-1, 1, 1).expand(-1, k, 1)).squeeze(-1)
    return ((w >> ((j % 8) * 4).view(-1, 1)) & 0xF) - 8


def wna16_isa(scale_dtype: torch.dtype) -> str:
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import _get_isa_hint

    isa = _get_isa_hint(scale_dtype)
    if isa == "amx":
        # Linux hands out AMX tiles only after the process asks (arch_prctl); oneDNN asks on first use, the
        # WNA16 kernel does not -> without this the first lm_head call dies with SIGILL.
        torch.cpu._init_amx()
    return isa


def wna16_matmul(x: torch.Tensor, table: torch.Tensor, scales_row: torch.Tensor, isa: str) -> torch.Tensor:
    """`x @ (q * scale)^T` with q read from the blocked table; scales_row is [1, N] in x.dtype."""
    import vllm._custom_ops as ops

    return ops.cpu_gemm_wna16(input=x, q_weight=table, scales=scales_row, zeros=None, bias=None,
                              pack_factor=8, isa_hint=isa)
