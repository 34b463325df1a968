"""`python -m kernels.cpu_bench`: it times what it says (every quantized matmul of the checkpoint, and the bf16
linear a vLLM CPU engine really builds as the baseline). Timings themselves are benchmarks, not asserted here."""

import json

import pytest
import torch

from kernels import cpu_bench


def test_vllm_bf16_baseline_is_the_engines_linear_and_computes_x_wt():
    """The `vllm_bf16` column times vLLM's own CPU dispatch of an unquantized bf16 weight (oneDNN / SGL), and that
    callable computes x @ W^T. Bound: a bf16-output GEMM may round partial sums into its bf16 destination once per
    K chunk (oneDNN does; measured here: 0.3 * 2^-9 * sum|x w|, F.linear the same); each rounding adds at most
    2^-9 * sum|x w|, so 2^-7 * sum|x w| allows four of them. A transposed, mis-scaled or wrong weight is off by
    O(sum|x w|)."""
    torch.manual_seed(0)
    n, k, m = 96, 640, 16
    wb = torch.randn(n, k, dtype=torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    f = cpu_bench.vllm_bf16_linear(wb)
    assert f is not None  # the CPU lock has vLLM: the baseline column must exist here
    y = f(x)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    ref = x.float() @ wb.float().T
    bound = 2.0**-7 * (x.float().abs() @ wb.float().abs().T)
    assert ((y.float() - ref).abs() <= bound).all()


@pytest.fixture(scope="module")
def tiny_mobile(tiny_gemma3, tmp_path_factory):
    from tests.fixtures_ckpt import write_mobile_checkpoint

    return write_mobile_checkpoint(tiny_gemma3, tmp_path_factory.mktemp("bench") / "mobile")


def test_profile_covers_every_matmul_of_the_checkpoint(tiny_mobile):
    """Every quantized linear of a (tiny) mobile checkpoint appears with its per-token count, fused as vLLM fuses
    q/k/v and gate/up, plus the tied lm_head; every row has all three timings and the totals sum them."""
    ckpt = tiny_mobile
    res = cpu_bench.profile(ckpt, [1, 2], reps=1)
    cfg = json.loads((ckpt / "config.json").read_text())
    layers = cfg.get("text_config", cfg)["num_hidden_layers"]
    kinds: dict[str, int] = {}
    for r in res["rows"]:
        if r["m"] == 1:  # one row per (module kind, shape, bits) and M; this checkpoint mixes 2/4/8-bit layers
            kinds[r["module"]] = kinds.get(r["module"], 0) + r["per_token"]
    assert kinds == {"qkv_proj": layers, "o_proj": layers, "gate_up_proj": layers, "down_proj": layers,
                     "lm_head (tied table)": 1}
    for r in res["rows"]:
        assert r["packed_ms"] > 0 and r["bf16_ms"] > 0 and r["vllm_bf16_ms"] > 0
    for m in (1, 2):
        t = res["totals_per_step"][m]
        rows = [r for r in res["rows"] if r["m"] == m]
        assert abs(t["vllm_bf16_ms"] - sum(r["vllm_bf16_ms"] * r["per_token"] for r in rows)) < 1e-2


def test_step_mode_times_every_kind_on_both_paths(tiny_mobile):
    """`--step` (cold cache): one timed pass per step over every layer's own weights; each module kind appears on
    both paths and the per-kind times add up to the step total."""
    res = cpu_bench.step(tiny_mobile, [1, 3], reps=1)
    for m in (1, 3):
        for path in ("packed", "vllm_bf16"):
            r = res["m"][m][path]
            assert set(r) == {"total", "qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head (tied table)"}
            assert all(v > 0 for v in r.values())
            assert abs(r["total"] - sum(v for k, v in r.items() if k != "total")) < 0.01
