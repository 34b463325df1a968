"""Static int8 scales of the tied lm_head, calibrated by the recipe (Google's answer, `gemma_mobile.lm_head`).

The lm_head is the one quantized matmul that llmcompressor does not calibrate: it is tied to the quantized
embedding table, so the scheme ignores it (compressed-tensors would otherwise save a second, dense copy). With
`lm_head_scales` on, the modifier observes the lm_head's input (the final-norm hidden states, calibrated on the
already-quantized predecessors) with the recipe's activation observer, and at the end of calibration

    input_scale  = observer(h) scale                                    (per tensor, as every other SRQ input)
    output_scale = observer(logits) scale, logits = the served lm_head on the quantized table:
                   f32(clamp(round(h / input_scale), -128, 127) @ codes^T) * (input_scale * weight_scale[row])
                   (`kernels.reference.linear`, the plugin's numerics, without the output requantization)

Both scales are rounded to bf16 like every other activation scale of the checkpoint (compressed-tensors stores
them in the model dtype), so the f32 value the plugin reads is exactly the one the output range was computed with.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

logger = logging.getLogger(__name__)

LMHeadMode = Literal["both", "input", "none"]


class LMHeadCalibration:
    """Collects the lm_head's inputs during calibration; `finish(table)` returns the `gemma_mobile.lm_head` dict."""

    def __init__(self, mode: LMHeadMode, observer: str):
        from llmcompressor.observers import Observer

        from vllm_gemma_mobile.scheme.spec import activation_args

        self.mode = mode
        self._observer = observer
        self._input = Observer.load_from_registry(observer, base_name="input", args=activation_args(observer))
        self._inputs: list[torch.Tensor] = []

    def hook(self, module: torch.nn.Module, args, output) -> None:
        """Forward hook on the lm_head: observe its input (the output is the float head; not used)."""
        h = args[0].detach()
        self._input(h)
        self._inputs.append(h.reshape(-1, h.shape[-1]).cpu())

    @torch.no_grad()
    def finish(self, table: torch.nn.Module, name: str = "embed_tokens", chunk_rows: int = 16384,
               chunk_tokens: int = 4096) -> dict[str, float]:
        """Scales from the observed inputs and the table's calibrated `weight_scale` (see module docstring);
        QuantizeError if that scale is invalid (`name`: the table's module name, for the message)."""
        from compressed_tensors.quantization.lifecycle.forward import quantize
        from llmcompressor.observers import Observer

        from kernels import cpu_packed, layout, reference
        from kernels.scales import invalid_scales
        from vllm_gemma_mobile.quantize.checkpoint import QuantizeError
        from vllm_gemma_mobile.scheme.spec import activation_args

        if not self._inputs:
            raise RuntimeError("lm_head calibration saw no lm_head forward: the calibration pipeline never ran the "
                               "lm_head, so its static scales cannot be calibrated (set lm_head_scales: none)")
        s_x = _bf16_value(self._input.get_qparams()["scale"])
        if invalid_scales(torch.tensor(s_x)):  # the same rule as the served check, named here, before any use
            raise QuantizeError(f"{name} (lm_head) input_scale = {s_x}: its calibration inputs had no finite, non-zero "
                                "range, so the static lm_head scales cannot be calibrated; nothing was saved")
        out: dict[str, float] = {"input_scale": s_x}
        if self.mode == "both":
            h = torch.cat(self._inputs)
            w, ws, zp = table.weight, table.weight_scale, getattr(table, "weight_zero_point", None)
            bad = invalid_scales(ws.detach().float())
            if bad:
                raise QuantizeError(f"{name}.weight_scale: invalid table scale {bad} (must be finite and > 0): the "
                                    "lm_head's output range cannot be calibrated on it; nothing was saved")
            args = table.quantization_scheme.weights
            y_obs = Observer.load_from_registry(self._observer, base_name="output", args=activation_args(self._observer))
            packed_cpu = h.device.type == "cpu" and cpu_packed.available()
            for r0 in range(0, w.shape[0], chunk_rows):
                rows = slice(r0, r0 + chunk_rows)  # the codes exactly as compressed-tensors' packer computes them
                codes = quantize(w[rows], ws[rows], None if zp is None else zp[rows], args, dtype=torch.int8)
                pw = layout.from_int(codes, args.num_bits)
                for t0 in range(0, h.shape[0], chunk_tokens):
                    y = reference.linear(h[t0:t0 + chunk_tokens], pw, ws[rows].float(), input_scale=s_x,
                                         out_dtype=torch.float32, packed_cpu=packed_cpu)
                    y_obs(y)
            out["output_scale"] = _bf16_value(y_obs.get_qparams()["scale"])
        self._inputs.clear()
        logger.info("lm_head static scales (%s, %s observer): %s", self.mode, self._observer, out)
        return out


def _bf16_value(scale: torch.Tensor) -> float:
    return float(scale.reshape(-1)[0].to(torch.bfloat16).float())
