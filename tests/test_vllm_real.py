"""Real Gemma 3 270M mobile checkpoint (recipes/gemma3_mobile_ptq.yaml, cached under cache_dir()) served over
HTTP by `gemma-mobile serve`: greedy tokens vs the references (see the tolerance note below), chat
completions, 16 concurrent requests == serial."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ckpt import post, served  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, there was a little girl who",
           "The best way to learn a new language is", "Water is made of"]
N_TOKENS = 32


# `real_mobile` (conftest): the recipe checkpoint `make demo` serves, rebuilt when its build key changes.


_post = post


@pytest.fixture(scope="module")
def server(real_mobile, tmp_path_factory):
    logf = tmp_path_factory.mktemp("real_serve") / "serve.log"
    with served(real_mobile, logf, max_model_len=512, health_timeout=1200) as (_, base):
        yield base, logf


def _complete(base: str, model: str, ids: list[int], n: int = N_TOKENS):
    r = _post(base + "/v1/completions", {"model": model, "prompt": ids, "max_tokens": n, "temperature": 0,
                                         "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True})
    lp = r["choices"][0]["logprobs"]
    toks = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
    return toks, lp["token_logprobs"], r["choices"][0]["text"]


def test_real_checkpoint_http_greedy_vs_references(server, real_mobile):
    """32 greedy tokens x 4 prompts over HTTP, teacher-forced through two references: the contract-exact one
    (tests/fixtures_ckpt.fake_quant_reference: int products exact, f32 epilogue, like the plugin) and
    `load_reference` (transformers + compressed-tensors fake quant in bf16, KV fake quant off).

    Tolerance, explained: the recipe's PTQ checkpoint of Gemma 3 270M is numerically chaotic (its text is
    incoherent in every implementation; static input scales clip the BOS-position activations), so a one-step
    int8 rounding difference anywhere changes later tokens — the two references themselves agree on only
    ~25% of teacher-forced tokens. Exact greedy equality is therefore asserted on the tiny model
    (test_vllm_engine) and here the plugin must be at least as close to the contract-exact reference as the
    compressed-tensors reference is, and agree with it on the first generated token for most prompts."""
    import torch

    from fixtures_ckpt import fake_quant_reference
    from vllm_gemma_mobile.contract import read_contract
    from vllm_gemma_mobile.evaluate.reference import install_kv_fake_quant, kv_specs, load_reference

    base, logf = server
    model = Path(real_mobile).name  # gemma-mobile serve's default served name: the directory's name
    exact, tok = fake_quant_reference(real_mobile)
    # the plugin's KV cache is quantized (int8/int4): both references with the evaluation's KV fake quant
    install_kv_fake_quant(exact, kv_specs(read_contract(real_mobile)))
    ct, _ = load_reference(real_mobile, numerics="bf16")  # compressed-tensors fake quant; KV fake quant on
    agree_plugin, agree_refs, agree_plugin_ct, total = 0, 0, 0, 0
    texts = []
    for p in PROMPTS:
        ids = tok(p).input_ids
        assert ids[0] == tok.bos_token_id
        toks, _, text = _complete(base, model, ids)
        assert len(toks) == N_TOKENS
        texts.append(text)
        seq = torch.tensor([ids + toks])
        with torch.no_grad():
            a = exact(seq).logits[0, len(ids) - 1:-1].argmax(-1)
            b = ct(seq).logits[0, len(ids) - 1:-1].argmax(-1)
        got = torch.tensor(toks)
        agree_plugin += int((a == got).sum())
        agree_plugin_ct += int((b == got).sum())
        agree_refs += int((a == b).sum())
        total += N_TOKENS
    print(texts)
    print(f"teacher-forced agreement /{total}: plugin-exact {agree_plugin}, plugin-ct {agree_plugin_ct}, "
          f"exact-ct {agree_refs}")
    assert agree_plugin >= agree_refs, (agree_plugin, agree_refs)
    assert "gemma_mobile: quantized KV cache active" in logf.read_text()


def test_real_checkpoint_chat_and_concurrency(server, real_mobile):
    base, _ = server
    model = Path(real_mobile).name  # gemma-mobile serve's default served name: the directory's name
    r = _post(base + "/v1/chat/completions", {"model": model, "max_tokens": 16, "temperature": 0,
                                              "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r["choices"][0]["message"]["content"].strip()
    prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (variant {i})") for i in range(16)]

    def one(p):
        return _post(base + "/v1/completions", {"model": model, "prompt": p, "max_tokens": 16, "temperature": 0,
                                                "ignore_eos": True})["choices"][0]["text"]

    serial = [one(p) for p in prompts]
    with ThreadPoolExecutor(16) as ex:
        concurrent = list(ex.map(one, prompts))
    assert concurrent == serial
