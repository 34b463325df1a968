"""The quantized hybrid KV cache in vLLM (CPU), on the tiny Gemma 3 mobile checkpoint (5 sliding layers int8,
1 global layer int4; head_dim 32, 1 KV head, sliding window 16):

- the cache vLLM allocates is bytes (uint8), 64 B/token in int8 layers and 32 B/token in the int4 layer (bf16:
  128 B/token in every layer) - a bf16 cache fails this;
- same KV memory: twice the blocks and the reported capacity in tokens grows by the expected factor vs the
  `GEMMA_MOBILE_KV_CACHE=bf16` switch, which serves an unquantized page with the same kernels and equals the
  reference WITHOUT KV fake quant exactly;
- greedy tokens == the contract reference WITH its KV fake quant on (evaluate.reference), incl. a chunked
  prefill; prefix caching and mixed-length batching change nothing;
- start-up errors: NaN / missing KV scale (names the tensor), `--kv-cache-dtype fp8`.

One engine (enforce_eager, block_size 32 so prefix caching can hit within max_model_len, max_num_batched_tokens
64 so long prompts are chunked); the bf16 engine and the failing starts run in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ckpt import compare_greedy, fake_quant_reference, write_mobile_checkpoint  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model inspection


# Linears: vLLM's CPU int8 kernels where this CPU has exact ones, else the plugin's exact torch ops (logged).
ENGINE = dict(enforce_eager=True, max_model_len=512, dtype="bfloat16", seed=0, block_size=32,
              max_num_batched_tokens=64)
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at"]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 16)  # ~145 tokens: chunked prefill (64/step)
N_TOKENS = 24
COARSE = 6.0  # KV scale multiplier (see mobile_tiny)


@pytest.fixture(scope="module")
def mobile_tiny(tmp_path_factory) -> Path:
    from conftest import cache_dir

    from vllm_gemma_mobile.models.gemma3_base import build_base
    from vllm_gemma_mobile.models.tiny import build_tiny

    base = build_base("gemma3-270m", cache_dir() / "gemma3-270m-bf16")
    d = tmp_path_factory.mktemp("vllm_kv")
    tiny = build_tiny("gemma3", d / "base", tokenizer_from=base)
    ckpt = write_mobile_checkpoint(tiny, d / "tiny-gemma3-mobile")
    # KV scales x COARSE (the codes span 1/COARSE of their levels): with the calibrated scales, KV quantization
    # moves this random model's log-probs no more than bf16 rounding does (measured: the reference without KV
    # fake quant was as close to the engine as the one with it), so no greedy/log-prob test could tell a
    # quantized cache from a bf16 one; coarse scales make the KV numerics visible.
    from safetensors.torch import load_file, save_file

    t = load_file(str(ckpt / "model.safetensors"))
    for k in [k for k in t if k.endswith(("self_attn.k_scale", "self_attn.v_scale"))]:
        t[k] = t[k] * COARSE
    save_file(t, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt


@pytest.fixture(scope="module")
def llm(mobile_tiny):
    from vllm import LLM

    engine = LLM(str(mobile_tiny), **ENGINE)
    yield engine
    del engine


def _greedy(n: int = N_TOKENS, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)


def _capacity(engine) -> int:
    cc = engine.llm_engine.vllm_config.cache_config
    tokens = getattr(cc, "kv_cache_size_tokens", None)
    assert tokens, "engine did not report its KV capacity"
    return int(tokens)


# The Triton interpreter runs ~20 programs per second here (one per query token and head): its engine batches
# at most 16 tokens per step and serves one short and one 3-chunk prompt for 8 tokens (~1k programs).
SMALL = dict(engine={**ENGINE, "max_num_batched_tokens": 16, "max_model_len": 128},
             prompts=[PROMPTS[0], " ".join(["the quick brown fox jumps over the lazy dog"] * 4)], tokens=8)


def _greedy_cases(engine, prompts: list[str] | None = None, tokens: int = N_TOKENS, chunk: int = 0) -> list:
    """[(prompt_ids, tokens, chosen-token logprobs)] of PROMPTS + [LONG] (or `prompts`; the last one is prefilled
    in more than two chunks of `chunk` tokens and decoded past the window)."""
    outs = engine.generate(prompts or PROMPTS + [LONG], _greedy(tokens, logprobs=1))
    assert len(outs[-1].prompt_token_ids) > 2 * (chunk or ENGINE["max_num_batched_tokens"])
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
             [d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]) for o in outs]


def probe(model: str, out: str, small: bool = False) -> None:
    """Subprocess entry: start an engine with ENGINE settings (SMALL ones if `small`), write its greedy outputs
    (`_greedy_cases`), then its KV layout (incl. the kernels that forward ran) and capacity as JSON."""
    from vllm import LLM

    from vllm_gemma_mobile.vllm.kv_cache import describe_kv_cache

    if small:
        engine = LLM(model, **SMALL["engine"])
        cases = _greedy_cases(engine, SMALL["prompts"], SMALL["tokens"], SMALL["engine"]["max_num_batched_tokens"])
    else:
        engine = LLM(model, **ENGINE)
        cases = _greedy_cases(engine)
    Path(out).write_text(json.dumps({"layers": engine.apply_model(describe_kv_cache)[0],
                                     "capacity": _capacity(engine), "cases": cases}))


def _probe_in_subprocess(model: Path, out: Path, env: dict, small: bool = False, timeout: int = 900) -> dict:
    """`probe` in a fresh process with `env` added (vLLM reads these switches at start-up); its JSON + log."""
    code = ("import sys; sys.path.insert(0, %r)\nfrom test_vllm_kv import probe\nprobe(%r, %r, small=%r)\n"
            % (str(Path(__file__).parent), str(model), str(out), small))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **env})
    assert p.returncode == 0, p.stderr[-3000:]
    return {**json.loads(out.read_text()), "log": p.stdout + p.stderr}


@pytest.fixture(scope="module")
def bf16_switch(mobile_tiny, tmp_path_factory) -> dict:
    """`probe` of the same checkpoint with GEMMA_MOBILE_KV_CACHE=bf16, in a subprocess (start-up log included)."""
    return _probe_in_subprocess(mobile_tiny, tmp_path_factory.mktemp("bf16_switch") / "bf16.json",
                                {"GEMMA_MOBILE_KV_CACHE": "bf16"})


# ------------------------------------------------------------------------------------------- allocation


def test_allocated_cache_is_quantized(llm):
    """Fails with a bf16 cache: the tensors vLLM bound to the layers are bytes, 1 (int8) or 0.5 (int4) byte per
    element, and the layers run the gemma_mobile impl."""
    from vllm_gemma_mobile.vllm.kv_cache import describe_kv_cache

    llm.generate(["Hello"], _greedy(2))  # one real forward: the impls pick their kernels at the first call
    layers = llm.apply_model(describe_kv_cache)[0]
    assert [x["bits"] for x in layers] == [8, 8, 8, 8, 8, 4]
    assert [x["impl"] for x in layers] == ["GemmaMobileKV8Impl"] * 5 + ["GemmaMobileKV4Impl"]
    # that forward ran the C++ kernels over the codes (kernels/cpu_kv.py), not the torch reference
    assert {x["kernels"] for x in layers} == {"kernels.cpu_kv.paged_attention"}
    assert all(x["dtype"] == "torch.uint8" for x in layers)
    # 1 KV head x head_dim 32 x (K + V): int8 64 B/token, int4 32 B/token (bf16 would be 128)
    assert [x["bytes_per_token"] for x in layers] == [64.0] * 5 + [32.0]
    assert [x["shape"][-1] for x in layers] == [64] * 5 + [32]


def test_float_ops_use_reference_rounding(llm):
    """Every rotary and RMSNorm module of the served model runs transformers' rounding (float_ops.apply via the
    plugin's load hook); their bitwise equality with transformers is tests/test_float_ops.py."""
    from vllm_gemma_mobile.vllm.float_ops import describe

    d = llm.apply_model(describe)[0]
    assert d["rotary_total"] >= 1 and d["rotary"] == d["rotary_total"], d
    assert d["rms_norm_total"] == 6 * 6 + 1 and d["rms_norm"] == d["rms_norm_total"], d  # 4 + q/k norms per layer


def test_capacity_vs_bf16_switch(llm, bf16_switch):
    """Same VLLM_CPU_KVCACHE_SPACE: the bf16 switch gets half the blocks (every page is twice as large), and the
    reported token capacity is 18/7 = 2.571x smaller. vLLM's capacity = blocks / blocks reserved per
    512-token request: each of the 5 sliding layers reserves cdiv(window 16 - 1 + 64 in-flight, 32) + 1 = 4
    blocks of 32 tokens in both modes; the global layer needs 512 tokens = 16 bf16 blocks of 32 tokens, but
    only 8 int4 blocks (an int4 page holds 64 tokens in the bytes of a 32-token int8 page). bf16: 36 blocks of
    4 KiB per request, quantized: 28 blocks of 2 KiB -> 36 * 4 / (28 * 2) = 18/7. The bf16 switch is the
    plugin's attention (the same C++ kernels) over an unquantized page of bf16 values: 128 B/token like vLLM's
    own bf16 cache (whose run, GEMMA_MOBILE_KV_CACHE=vllm, is the KV benchmark's baseline: test_vllm_kv_bench)."""
    bf = bf16_switch
    assert "KV cache in the model dtype (GEMMA_MOBILE_KV_CACHE=bf16" in bf["log"]
    assert all(x["dtype"] == "torch.uint8" and x["bytes_per_token"] == 128.0 for x in bf["layers"])
    assert {x["impl"] for x in bf["layers"]} == {"GemmaMobileKV16Impl"}
    assert {x["kernels"] for x in bf["layers"]} == {"kernels.cpu_kv.paged_attention"}

    from vllm_gemma_mobile.vllm.kv_cache import describe_kv_cache

    q = llm.apply_model(describe_kv_cache)[0]
    assert sum(x["bytes"] for x in q) == sum(x["bytes"] for x in bf["layers"])  # same memory
    assert q[0]["shape"][0] == 2 * bf["layers"][0]["shape"][0]  # twice the blocks
    ratio = _capacity(llm) / bf["capacity"]
    print(f"KV capacity: quantized {_capacity(llm):,} tokens vs bf16 {bf['capacity']:,} = {ratio:.4f}x")
    assert ratio == pytest.approx(18 / 7, rel=1e-3)


# ------------------------------------------------------------------------------------------- numerics


def _reference_with_kv_fake_quant(ckpt: Path):
    """The evaluation reference (`gemma-mobile eval`'s `load_reference`: the contract's exact integer numerics)
    with its KV fake quant on, on all 6 attention layers."""
    from vllm_gemma_mobile.evaluate.reference import load_reference

    model, _ = load_reference(ckpt)
    assert sum(hasattr(m, "_gemma_mobile_kv") for m in model.modules()) == 6
    return model


def test_greedy_matches_reference_with_kv_fake_quant(llm, mobile_tiny):
    """Served == evaluated, exactly: greedy tokens (incl. a 145-token prompt prefilled in 64-token chunks and
    decoding past the 16-token window) equal the reference's argmax at every step with no near-tie allowance,
    and chosen-token log-probs agree within 1e-4 nats. Both sides run the same integer linears, the same KV
    kernels (`kernels.plugin.kv_kernels`, whose per-row summation order does not depend on chunks or blocks)
    and, since vllm/float_ops.py, the same float rounding of RoPE and the residual norms, so the logits are the
    same bf16 values; what remains is the log-softmax's f32 reduction order (~1e-6). Before float_ops this gap
    was up to 0.35 nats."""
    from vllm_gemma_mobile.evaluate.reference import kv_fake_quant_enabled

    cases = _greedy_cases(llm)
    model = _reference_with_kv_fake_quant(mobile_tiny)
    with torch.no_grad():
        print("with KV fake quant:", compare_greedy(model, cases, max_lp_diff=1e-4, max_ties=0))
        # the check is sensitive: the same reference WITHOUT KV fake quant is out of tolerance
        kv_fake_quant_enabled(model, False)
        with pytest.raises(AssertionError) as e:
            compare_greedy(model, cases, max_lp_diff=1e-4, max_ties=0)
    print("reference without KV fake quant:", str(e.value)[:160])


def test_bf16_switch_matches_reference_without_kv_fake_quant(bf16_switch, mobile_tiny):
    """Served == evaluated without KV quantization too: the bf16 switch's greedy tokens and log-probs equal the
    reference with its KV fake quant OFF exactly (no tie allowance, 1e-4 nats: the log-softmax's f32 reduction
    order), because both attend with the same kernels over the same bf16 K/V. Sensitive: the same reference with
    the KV fake quant ON is out of tolerance. (Before, vLLM's own attention served the switch: 6.8 % apart in
    perplexity on the real 270M.)"""
    from vllm_gemma_mobile.evaluate.reference import kv_fake_quant_enabled

    cases = [tuple(c) for c in bf16_switch["cases"]]
    model = _reference_with_kv_fake_quant(mobile_tiny)
    with torch.no_grad():
        kv_fake_quant_enabled(model, False)
        print("without KV fake quant:", compare_greedy(model, cases, max_lp_diff=1e-4, max_ties=0))
        kv_fake_quant_enabled(model, True)
        with pytest.raises(AssertionError) as e:
            compare_greedy(model, cases, max_lp_diff=1e-4, max_ties=0)
    print("reference with KV fake quant:", str(e.value)[:160])


def test_prefix_caching_same_outputs(llm):
    """A shared 100+-token prefix: outputs from cached blocks == outputs after a cache reset."""
    prefix = LONG[: len(LONG) * 3 // 4]
    a, b = prefix + " and then the cat", prefix + " while the bird"
    llm.reset_prefix_cache()
    cold = llm.generate([b], _greedy(logprobs=1))[0]
    assert not cold.num_cached_tokens
    llm.generate([a], _greedy(4))
    warm = llm.generate([b], _greedy(logprobs=1))[0]
    assert warm.num_cached_tokens and warm.num_cached_tokens >= 64, warm.num_cached_tokens
    assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids)


def test_mixed_length_batch_equals_serial(llm):
    prompts = PROMPTS + [LONG, LONG[:200], "Hi", PROMPTS[1] + " " + LONG[:90]]
    batch = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, _greedy())]
    serial = [list(llm.generate([p], _greedy())[0].outputs[0].token_ids) for p in prompts]
    assert batch == serial


# ------------------------------------------------------------------------------------------- the CUDA path


def test_cuda_backend_contract():
    """The CUDA backends (no CUDA engine here, so what vLLM asks of a backend class is checked directly): for
    Gemma 3 / Gemma 4 attention (head_dim 256 and 512, bf16, block 16, sliding window, decoder) vLLM's own
    `validate_configuration` finds nothing to refuse; the page is the CPU backend's (same bytes per token); the
    registered names resolve through `AttentionBackendEnum`; f16 models and the bf16 comparison page are refused
    on CUDA with a message; vLLM's generic spec code (`customize_attention_spec`) takes the page."""
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout
    from vllm.v1.worker.utils import customize_attention_spec

    from vllm_gemma_mobile.vllm import kv_attention as ka

    ka.register_backends()
    for bits in (8, 4):
        cuda, cpu = ka.backend_for(bits, "cuda"), ka.backend_for(bits, "cpu")
        assert cuda is not cpu and cuda.get_impl_cls() is cpu.get_impl_cls()
        assert AttentionBackendEnum[cuda.get_name()].get_class() is cuda
        assert cuda.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
        assert not cuda.forward_includes_kv_cache_update
        for head in (256, 512):
            for window in (True, False):
                why = cuda.validate_configuration(head, torch.bfloat16, "auto", 16, False, False, False, False,
                                                  False, DeviceCapability(9, 0), "decoder", has_sliding_window=window)
                assert why == [], (bits, head, why)
            spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=head, dtype=torch.bfloat16)
            got = customize_attention_spec(cuda, spec)
            assert got.dtype == torch.uint8 and got.page_size_bytes == cpu.customize_spec(spec).page_size_bytes
            assert got.page_size_bytes == 16 * 2 * head * bits // 8  # 16 tokens x (K + V) codes
        assert "dtype not supported" in cuda.validate_configuration(
            256, torch.float16, "auto", 16, False, False, False, False, False, DeviceCapability(9, 0), "decoder")
        assert "block_size not supported" in cuda.validate_configuration(
            256, torch.bfloat16, "auto", 8, False, False, False, False, False, DeviceCapability(9, 0), "decoder")
    with pytest.raises(ValueError, match="bf16.*CPU-only.*GEMMA_MOBILE_KV_CACHE=vllm"):
        ka.backend_for(16, "cuda")
    with pytest.raises(ValueError, match="CPU and CUDA only"):
        ka.backend_for(8, "xpu")


def test_triton_kernels_serve_the_cache_and_equal_the_reference(mobile_tiny, tmp_path, monkeypatch):
    """The CUDA path's kernels inside a real engine: with GEMMA_MOBILE_KV_BACKEND=triton and TRITON_INTERPRET=1 the
    plugin's KV impl (the one both backends use) writes and attends with `kernels/kvcache_triton.py` over vLLM's
    uint8 pages, incl. chunked prefill and decoding past the window (`SMALL`: the interpreter is slow); greedy
    tokens and log-probs equal the reference (`kv_kernels` gives it the same Triton kernels) with no tie
    allowance, 1e-4 nats (the log-softmax's f32 reduction order). Sensitive: the same reference without KV fake quant is out of tolerance."""
    from vllm_gemma_mobile.evaluate.reference import kv_fake_quant_enabled

    env = {"GEMMA_MOBILE_KV_BACKEND": "triton", "TRITON_INTERPRET": "1"}  # linears stay on the C++ kernels
    got = _probe_in_subprocess(mobile_tiny, tmp_path / "triton.json", env, small=True, timeout=1200)
    assert {x["kernels"] for x in got["layers"]} == {"kernels.kvcache_triton.paged_attention_triton"}
    assert [x["bytes_per_token"] for x in got["layers"]] == [64.0] * 5 + [32.0]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cases = [tuple(c) for c in got["cases"]]
    model = _reference_with_kv_fake_quant(mobile_tiny)
    with torch.no_grad():
        print("Triton KV, with KV fake quant:", compare_greedy(model, cases, max_lp_diff=1e-4, max_ties=0))
        kv_fake_quant_enabled(model, False)  # K/V unquantized: the "bits 16" page, which only the C++ kernels hold
        monkeypatch.delenv("GEMMA_MOBILE_KV_BACKEND")
        with pytest.raises(AssertionError):
            compare_greedy(model, cases, max_lp_diff=1e-4, max_ties=0)


# ------------------------------------------------------------------------------------------- start-up errors


def _start(model: Path, **kw) -> subprocess.CompletedProcess:
    code = f"from vllm import LLM\nLLM({str(model)!r}, enforce_eager=True, max_model_len=128, **{kw!r})\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ})


@pytest.mark.parametrize("case", ["nan", "missing"])
def test_bad_kv_scale_fails_at_start(mobile_tiny, tmp_path, case):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(mobile_tiny, bad)
    t = load_file(str(bad / "model.safetensors"))
    if case == "nan":
        t["model.layers.2.self_attn.v_scale"].fill_(float("nan"))
        expect = "model.layers.2.self_attn.v_scale = nan"
    else:
        del t["model.layers.5.self_attn.k_scale"]
        expect = "model.layers.5.self_attn.k_scale: missing"
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    p = _start(bad)
    assert p.returncode != 0
    assert expect in p.stderr, p.stderr[-3000:]


def test_kv_cache_dtype_fp8_contradicts_checkpoint(mobile_tiny):
    p = _start(mobile_tiny, kv_cache_dtype="fp8")
    assert p.returncode != 0
    out = p.stdout + p.stderr  # the error is raised in the worker process, which logs to stdout
    assert "--kv-cache-dtype fp8 contradicts the checkpoint" in out, out[-3000:]
