"""Automatic bit allocation: `gemma-mobile quantize BASE --recipe R --out OUT --size-budget 150MB`.

Picks the weight bits (2, 4 or 8) of every *unit* - the tied table, each layer's attention (q/k/v/o together),
each layer's MLP (gate/up/down together) - so that the checkpoint fits the budget with the least predicted
damage, then runs the recipe with those bits (`embed_bits`, `attention_bits_by_layer`, `mlp_bits_by_layer`).

Sensitivity (measured, one unit at a time): the base model in f32 with ONLY that unit's weights quantized at b
bits (the recipe's weight quantizer: symmetric per-row scales with llmcompressor's memoryless MSE observer and the
scheme's observer kwargs, round to nearest; no GPTQ, activations float), KL(base || that model) of the next-token
distributions on `tokens` calibration tokens (the calibration split, never the evaluation plays). The damage of a
map is predicted as the sum of its units' KL increases (the usual additive assumption; the report shows the
prediction and what the built checkpoint measures). Activation and KV quantization are the same for every map
and are not part of the search.

Size: the safetensors bytes the recipe writes for the unit at b bits (packed int32 codes, one bf16 scale per row,
the int64 weight shape, bf16 input/output scales for linears) plus everything else of the checkpoint as it is
(bf16). The budget is met by an exact multiple-choice knapsack over bytes rounded UP to `1 / 4096` of the budget
(so the chosen map never exceeds it).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

BITS = (2, 4, 8)
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_size(text: str | int | float) -> int:
    """'150MB' / '150e6' / '1.5GiB' / 150000000 -> bytes (MB = 10^6, MiB = 2^20)."""
    if isinstance(text, (int, float)):
        value, unit = float(text), None
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ValueError(f"size budget {text!r}: expected a number of bytes with an optional unit (e.g. 150MB)")
        value, unit = float(m.group(1)), (m.group(2) or "").lower() or None
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"size budget {text!r} must be positive")
    return n


@dataclass
class Unit:
    name: str                 # "embed", "attention.L", "mlp.L"
    modules: list[str]
    shapes: list[tuple[int, int]]
    activations: bool         # linears carry bf16 input / output scales

    def bytes_at(self, bits: int) -> int:
        per = 0
        for n, k in self.shapes:
            per += n * math.ceil(k * bits / 32) * 4 + n * 2 + 16 + (4 if self.activations else 0)
        return per


def find_units(model: torch.nn.Module) -> list[Unit]:
    """The allocation units of a Gemma 3 text model: the tied table, then attention / MLP per layer."""
    from vllm_gemma_mobile.scheme.spec import _module_kind

    groups: dict[str, Unit] = {}
    for name, mod in model.named_modules():
        kl = _module_kind(name)
        if kl is None or kl[0] not in ("embed", "attention", "mlp"):
            continue
        kind, layer = kl
        key = "embed" if kind == "embed" else f"{kind}.{layer}"
        u = groups.setdefault(key, Unit(key, [], [], kind != "embed"))
        u.modules.append(name)
        u.shapes.append(tuple(mod.weight.shape))
    if "embed" not in groups:
        raise ValueError("no embed_tokens table found: bit allocation needs the tied table")
    return [groups["embed"]] + [groups[k] for k in sorted((k for k in groups if k != "embed"),
                                                          key=lambda k: (int(k.split(".")[1]), k))]


@torch.no_grad()
def fake_quant_weight(w: torch.Tensor, bits: int, observer_kwargs: dict | None = None) -> torch.Tensor:
    """The recipe's round-to-nearest weight quantizer (per-row symmetric, memoryless MSE scales), dequantized."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from vllm_gemma_mobile.quantize.variants import weight_qparams

    args, scale, zero_point = weight_qparams(w, bits, "mse", observer_kwargs)
    return fake_quantize(w, scale, zero_point, args)


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    lp = torch.log_softmax(logits.float(), -1)
    return float((ref_logp.exp() * (ref_logp - lp)).sum(-1).mean())


@torch.no_grad()
def measure_sensitivity(base: str | Path, tokens: int = 1024, seq_len: int = 256, bits=BITS,
                        observer_kwargs: dict | None = None) -> tuple[list[Unit], dict[str, dict[int, float]], int]:
    """(units, {unit: {bits: KL increase}}, bytes of everything outside the units) for BASE (module docstring)."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vllm_gemma_mobile.quantize.run import calibration_token_ids

    base = Path(base)
    # checked on the config alone, before any weights are read
    config = AutoConfig.from_pretrained(base)
    if not getattr(config, "model_type", "").startswith("gemma3"):
        raise ValueError(f"{base}: --size-budget allocates Gemma 3 bits only (model_type "
                         f"{config.model_type!r}; Gemma 4's PLE and per-layer projections are not units yet)")
    n_layers = config.get_text_config().num_hidden_layers  # a multimodal Gemma 3 nests it in text_config
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    n_seq = max(1, tokens // seq_len)
    ids = torch.tensor([s for s in calibration_token_ids(tok, n_seq * 2, seq_len) if len(s) == seq_len][:n_seq])
    units = find_units(model)
    ref = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    mods = dict(model.named_modules())
    in_units = {id(mods[m].weight) for u in units for m in u.modules}
    # everything else is written as bf16, plus one bf16 k_scale and v_scale per layer (each Gemma 3 layer has a cache)
    rest = sum(p.numel() * 2 for p in model.parameters() if id(p) not in in_units) \
        + 4 * n_layers
    sens: dict[str, dict[int, float]] = {}
    bar = tqdm(total=len(units) * len(bits), desc="bit sensitivity", unit="eval")
    for u in units:
        saved = {m: mods[m].weight.data.clone() for m in u.modules}
        sens[u.name] = {}
        for b in bits:
            for m in u.modules:
                mods[m].weight.data = fake_quant_weight(saved[m], b, observer_kwargs)
            sens[u.name][b] = _kl(ref, model(input_ids=ids).logits)
            bar.update(1)
        for m in u.modules:
            mods[m].weight.data = saved[m]
    bar.close()
    return units, sens, rest


def solve(units: list[Unit], sens: dict[str, dict[int, float]], rest_bytes: int, budget: int,
          bits=BITS, cells: int = 4096) -> dict[str, int]:
    """Exact multiple-choice knapsack: one bit width per unit, total bytes <= budget, least summed KL."""
    free = budget - rest_bytes
    if free <= 0:
        raise ValueError(f"size budget {budget} B is below the unquantized rest of the model ({rest_bytes} B)")
    step = free / cells
    inf = float("inf")
    best = [0.0] + [inf] * cells            # best[c]: least KL with cost exactly c cells
    choice: list[list[int | None]] = []
    for u in units:
        new = [inf] * (cells + 1)
        pick: list[int | None] = [None] * (cells + 1)
        for b in bits:
            cost = math.ceil(u.bytes_at(b) / step)  # rounded up: the real size can only be smaller
            kl = sens[u.name][b]
            for c in range(cells - cost, -1, -1):
                if best[c] < inf and best[c] + kl < new[c + cost]:
                    new[c + cost], pick[c + cost] = best[c] + kl, b
        best = new
        choice.append(pick)
    end = min(range(cells + 1), key=lambda c: best[c])
    if best[end] == inf:
        smallest = rest_bytes + sum(u.bytes_at(min(bits)) for u in units)
        raise ValueError(f"size budget {budget} B is too small: every unit at {min(bits)} bits needs {smallest} B")
    out: dict[str, int] = {}
    c = end
    for u, pick in zip(reversed(units), reversed(choice)):
        b = pick[c]
        out[u.name] = b
        c -= math.ceil(u.bytes_at(b) / step)
    return {u.name: out[u.name] for u in units}


def overrides_for(choice: dict[str, int]) -> dict[str, Any]:
    """Recipe options for a chosen map."""
    return {"embed_bits": choice["embed"],
            "attention_bits_by_layer": {int(k.split(".")[1]): b for k, b in choice.items() if k.startswith("attention.")},
            "mlp_bits_by_layer": {int(k.split(".")[1]): b for k, b in choice.items() if k.startswith("mlp.")}}


def allocate(base: str | Path, budget: int, tokens: int = 1024, observer_kwargs: dict | None = None) -> dict[str, Any]:
    """Measure, solve, and return {"overrides", "choice", "predicted_bytes", "predicted_kl", "sensitivity", ...}."""
    units, sens, rest = measure_sensitivity(base, tokens=tokens, observer_kwargs=observer_kwargs)
    choice = solve(units, sens, rest, budget)
    size = rest + sum(u.bytes_at(choice[u.name]) for u in units)
    report = {"budget_bytes": budget, "predicted_bytes": size, "rest_bytes": rest,
              "predicted_kl_increase": round(sum(sens[u.name][choice[u.name]] for u in units), 5),
              "choice": choice, "overrides": overrides_for(choice),
              "sensitivity": {k: {str(b): round(v, 5) for b, v in d.items()} for k, d in sens.items()},
              "unit_bytes": {u.name: {str(b): u.bytes_at(b) for b in BITS} for u in units},
              "method": "per-unit RTN (memoryless MSE) sensitivity, KL on calibration tokens, additive, exact knapsack",
              "tokens": tokens}
    logger.info("bit allocation for %d B: predicted %d B, KL +%.4f: %s", budget, size,
                report["predicted_kl_increase"], json.dumps(choice))
    return report
