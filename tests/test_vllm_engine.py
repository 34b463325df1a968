"""vLLM engine tests of the plugin on a tiny random Gemma 3 mobile checkpoint (real Gemma tokenizer):
offline `vllm.LLM` greedy == contract reference, batch == serial, one table in memory, validation errors
surfacing at engine start, HTTP (`gemma-mobile serve`: completions, chat, streaming, clean Ctrl-C).

Engines run with --enforce-eager, small max_model_len and a 1 GiB KV cache (2 shared cores here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ckpt import (compare_greedy, fake_quant_reference, group_alive, post, served,  # noqa: E402
                           write_mobile_checkpoint)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model inspection below

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
           "My name is", "The quick brown fox"]
N_TOKENS = 32
SERVED_NAME = "tiny-gemma3-mobile"  # the checkpoint directory's name = gemma-mobile serve's default model name


@pytest.fixture(scope="module")
def mobile_tiny(tmp_path_factory) -> Path:
    from conftest import cache_dir

    from vllm_gemma_mobile.models.gemma3_base import build_base
    from vllm_gemma_mobile.models.tiny import build_tiny

    base = build_base("gemma3-270m", cache_dir() / "gemma3-270m-bf16")
    d = tmp_path_factory.mktemp("vllm_tiny")
    tiny = build_tiny("gemma3", d / "base", tokenizer_from=base)
    # mixed 2/4/8-bit linears, 2-bit tied embedding, fused shards with different input/output scales
    return write_mobile_checkpoint(tiny, d / SERVED_NAME)


@pytest.fixture(scope="module")
def llm(mobile_tiny):
    from vllm import LLM

    engine = LLM(str(mobile_tiny), enforce_eager=True, max_model_len=256, dtype="bfloat16", seed=0)
    yield engine
    del engine


def _greedy(n: int = N_TOKENS, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)


def test_engine_uses_plugin_and_one_table(llm):
    assert llm.llm_engine.model_config.quantization == "gemma_mobile"

    from vllm_gemma_mobile.vllm.inspect_model import describe

    info = llm.apply_model(describe)[0]
    assert info["embedding_bits"] == 2 and info["lm_head_tied_to_embedding"] and info["lm_head_own_params"] == []
    from kernels.layout import padded_k
    from kernels import cpu_packed
    from vllm_gemma_mobile.vllm.cpu_ops import have_cpu_kernels

    # packed: our AVX2 kernels over the packed codes; torch: exact reference ops where vLLM's kernels are not
    backend = "packed" if cpu_packed.available() else "cpu" if have_cpu_kernels() else "torch"
    assert info["embedding_backend"] == backend and info["linear_backends"] == [backend]
    k = llm.llm_engine.model_config.hf_text_config.hidden_size
    v = info["vocab_x_hidden"] // k
    if backend == "cpu":
        assert info["table_bytes"] * 2 == info["vocab_x_hidden"]  # 4-bit containers, one copy for both uses
        assert info["table_codes_cache"] is None
    elif backend == "packed":
        assert info["table_bytes"] == v * padded_k(k, 2) // 4  # 2 bits/weight, one copy for both uses
        assert info["table_codes_cache"] is None  # read in place: no unpacked copy of the table
        assert info["linear_codes_cache_bytes"] == 0  # nor of any linear
    else:
        assert info["table_bytes"] == v * padded_k(k, 2) // 4  # 2 bits/weight, one copy for both uses
        # the torch path multiplies by exact bf16 codes of the table (the lm_head GEMM); nothing else is float
        assert info["table_codes_cache"] == {"dtype": "torch.bfloat16", "shape": [v, k]}
    assert info["float_2d_params"] == []  # no float weight parameters (norms are 1-D)
    # ... and no float matrix among ALL tensors the modules keep (gm_* attributes included), but that cache
    assert [n for n in info["float_2d_tensors"] if not n.endswith("embed_tokens.gm_state.packed.codes")] == []
    if backend == "packed":
        # no unpacked copy anywhere: the table and linears hold their packed words (+ 1-D scales) only. The
        # "as small as on disk" bound is asserted on the real 270M (test_vllm_real_memory): this tiny model's
        # hidden size 64 is padded to the 2-bit layout's 128-code groups, which doubles its table in memory.
        kept = info["kept_bytes"]
        assert kept["table"] < info["table_bytes"] + 3 * 4 * v  # + f32 scale vectors (V rows)
        assert kept["linears"] >= info["linear_packed_bytes"] > 0
    assert info["n_quant_linear"] == 6 * 4  # qkv, o, gate_up, down
    assert info["linear_bits"] == [2, 4, 8]
    assert len(info["kv"]) == 6 and all(k["k_scale"] > 0 and k["v_scale"] > 0 for k in info["kv"])
    assert [k["bits"] for k in info["kv"]] == [8, 8, 8, 8, 8, 4]


def test_greedy_matches_contract_reference(llm, mobile_tiny):
    """32 greedy tokens on 6 prompts equal the contract-exact fake-quant reference (HF Gemma 3, bf16,
    KV unquantized like the plugin in this version), up to bf16 near-ties (see fixtures_ckpt.compare_greedy).
    The int8 parts are exact on both sides; attention / norms / lm_head differ in bf16 rounding."""
    outs = llm.generate(PROMPTS, _greedy(logprobs=1))
    model, _ = fake_quant_reference(mobile_tiny)
    cases = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
              [d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]) for o in outs]
    print(compare_greedy(model, cases, max_lp_diff=0.35))


def test_16_concurrent_equal_serial(llm):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    batch = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, _greedy())]
    serial = [list(llm.generate([p], _greedy())[0].outputs[0].token_ids) for p in prompts]
    assert batch == serial


def test_invalid_checkpoint_fails_at_engine_start(mobile_tiny, tmp_path):
    """The load-time validator runs inside engine creation and names the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(mobile_tiny, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.3.mlp.gate_proj.input_scale"].zero_()
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code = ("from vllm import LLM\n"
            f"LLM({str(bad)!r}, enforce_eager=True, max_model_len=128)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert p.returncode != 0
    assert "model.layers.3.mlp.gate_proj.input_scale = 0.0" in p.stderr, p.stderr[-3000:]


# ------------------------------------------------------------------ HTTP through `gemma-mobile serve` / `vllm serve`


_post = post


def _models(base: str) -> list[str]:
    import json
    import urllib.request

    with urllib.request.urlopen(base + "/v1/models", timeout=60) as r:
        return [m["id"] for m in json.loads(r.read())["data"]]


def test_http_serve_completions_chat_streaming(mobile_tiny, llm, tmp_path):
    """`gemma-mobile serve DIR`: served as the directory's name (not its path), the printed examples use that
    name, completions / chat / streaming match the offline engine, Ctrl-C stops every process."""
    with served(mobile_tiny, tmp_path / "serve.log", max_model_len=256) as (proc, base):
        model = SERVED_NAME
        assert _models(base) == [SERVED_NAME]
        offline = llm.generate([PROMPTS[0]], _greedy(16))[0].outputs[0]
        r = _post(base + "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": 16,
                                             "temperature": 0, "ignore_eos": True})
        assert r["choices"][0]["text"] == offline.text
        chunks = _post(base + "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": 16,
                                                  "temperature": 0, "ignore_eos": True, "stream": True}, stream=True)
        assert "".join(c["choices"][0]["text"] for c in chunks) == offline.text and len(chunks) > 1
        r = _post(base + "/v1/chat/completions", {"model": model, "max_tokens": 8, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "Hello!"}]})
        assert r["choices"][0]["message"]["role"] == "assistant" and r["usage"]["completion_tokens"] > 0
        chunks = _post(base + "/v1/chat/completions", {"model": model, "max_tokens": 8, "temperature": 0,
                                                       "stream": True,
                                                       "messages": [{"role": "user", "content": "Hello!"}]},
                       stream=True)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == r["choices"][0]["message"]["content"]
        out = (tmp_path / "serve.log").read_text()
        assert "curl http://127.0.0.1" in out and "OpenAI(base_url" in out
        assert f'"model": "{SERVED_NAME}"' in out and f'model="{SERVED_NAME}"' in out
        assert "gemma_mobile: quantized KV cache active" in out
        proc.send_signal(signal.SIGINT)  # Ctrl-C to the front process only: it must forward and reap
        assert proc.wait(timeout=120) == 0
        time.sleep(1)
        assert not group_alive(proc.pid), "server processes survived Ctrl-C"


def test_vllm_serve_console_script(mobile_tiny, llm, tmp_path):
    """vLLM's own `vllm serve DIR` (vllm-cpu's console script, needs the `vllm` metadata alias) serves the
    checkpoint through the plugin, under vLLM's default name (the path as given). served() stops it (SIGINT,
    then SIGKILL to its process group)."""
    log = tmp_path / "vllm_serve.log"
    with served(mobile_tiny, log, max_model_len=256, command="vllm") as (proc, base):
        assert _models(base) == [str(mobile_tiny)]
        offline = llm.generate([PROMPTS[0]], _greedy(16))[0].outputs[0]
        r = _post(base + "/v1/completions", {"model": str(mobile_tiny), "prompt": PROMPTS[0], "max_tokens": 16,
                                             "temperature": 0, "ignore_eos": True})
        assert r["choices"][0]["text"] == offline.text
        assert "quantization=gemma_mobile" in log.read_text()  # the plugin claimed it, no flag


def test_upstream_without_plugin_cannot_load(mobile_tiny):
    """Finding: with the plugin disabled (VLLM_PLUGINS=''), vllm-cpu 0.32 routes the checkpoint to upstream
    compressed-tensors (CompressedTensorsWNA8O8Int = float fake-quant around a weight-only kernel) and dies at
    engine start: no CPU kernel for 8-bit (uint8b128) or 2-bit (uint2b2) weights; CPUWNA16 only takes 4-bit."""
    code = ("from vllm import LLM\n"
            f"LLM({str(mobile_tiny)!r}, enforce_eager=True, max_model_len=128)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1"})
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "quantization=compressed-tensors" in out
    assert "Failed to find a kernel that can implement the WNA16 linear layer" in out
