"""QAT (issue 9): the fake quant used in training IS the served numerics, the distillation loss falls, runs are
deterministic and resumable, and the exported checkpoint is served by the plugin unchanged."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ckpt import checkpoint_tensors, compare_greedy, write_mobile_checkpoint  # noqa: E402

from kernels import bitpack, reference as R  # noqa: E402
from kernels.layout import from_int  # noqa: E402
from vllm_gemma_mobile.qat.fakequant import QATLinear, QATTable  # noqa: E402
from vllm_gemma_mobile.qat.train import QATOptions, run_qat  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qat_linear_forward_is_the_served_linear_bitwise(bits):
    """QATLinear on a bf16 input == kernels.reference.linear (the plugin's torch backend) on the exported codes and
    scales, bit for bit (both: f32 IEEE x / s_x, RNE, exact integer accumulation, acc * (s_x * s_w), output SRQ)."""
    g = torch.Generator().manual_seed(bits)
    n, k = 48, 200
    lo, hi = bitpack.code_range(bits)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    ws = _bf16(torch.rand(n, 1, generator=g) * 0.02 + 0.005)
    sx, sy = float(_bf16(torch.tensor(0.03))), float(_bf16(torch.tensor(0.05)))
    lin = QATLinear(codes.float() * ws, ws, bits, sx, sy)
    x = (torch.randn(5, k, generator=g) * 2).bfloat16()
    got = lin(x)
    exp = lin.export()
    assert torch.equal(bitpack.ct_unpack(exp["weight_packed"], bits, k), codes)  # init = PTQ codes, exactly
    ref = R.linear(x, from_int(codes, bits), exp["weight_scale"].float().reshape(-1), exp["input_scale"].float(),
                   exp["output_scale"].float(), out_dtype=torch.float32)
    assert torch.equal(got, ref)
    got.sum().backward()  # straight-through: every learned tensor gets a gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lin.parameters())
    assert lin.weight_rel.grad.abs().sum() > 0 and lin.inp.rel.grad.abs() > 0


@pytest.mark.parametrize("trainable", [True, False])
def test_qat_table_head_is_the_served_int8_lm_head(trainable):
    """Trained table: f32 GEMM of the codes; frozen table on the CPU: `torch._int_mm` of the int8 codes forward, the
    f32 codes backward (`_FrozenCodesMatmul`). Both equal the served int8 lm_head bit for bit, and both input
    gradients equal the straight-through formula computed here in autograd's operation order."""
    g = torch.Generator().manual_seed(1)
    v, k = 64, 96
    codes = torch.randint(-2, 2, (v, k), generator=g, dtype=torch.int8)
    rs = _bf16(torch.rand(v, 1, generator=g) * 0.05 + 0.01)
    sx = float(_bf16(torch.tensor(0.02)))
    table = QATTable(codes.float() * rs, rs, 2, sx, None, trainable=trainable)
    h = torch.randn(2, 20, k, generator=g).bfloat16()
    ref = R.linear(h.reshape(-1, k), from_int(codes, 2), rs.reshape(-1), torch.tensor(sx), None,
                   out_dtype=torch.float32).reshape(2, 20, v)
    hf = h.float().requires_grad_(True)
    got = table.head(hf)
    assert torch.equal(got, ref)
    w = torch.randn(2, 20, v, generator=g)
    (got * w).sum().backward()
    r = torch.round(h.float() / sx)
    inside = ((r >= -128) & (r <= 127)).float()  # the clamp passes the gradient only inside the int8 range
    assert 0 < inside.sum() < inside.numel()
    # straight-through: d logits / d h = (s_x * s_row) * codes / s_x inside the range, in autograd's order
    assert torch.equal(hf.grad, (((w * (sx * rs.reshape(-1))) @ codes.float()) * inside) / sx)
    ids = torch.tensor([0, 5, 63])
    assert torch.equal(table.embed(ids), R.embedding(ids, from_int(codes, 2), rs.reshape(-1), torch.float32))


@pytest.fixture(scope="module")
def qat_setup(tmp_path_factory):
    from vllm_gemma_mobile.models.tiny import build_tiny

    d = tmp_path_factory.mktemp("qat")
    base = build_tiny("gemma3", d / "base")
    # 2-bit MLPs everywhere: a PTQ start far enough from the teacher for the loss to have room to fall
    ptq = write_mobile_checkpoint(base, d / "ptq", scale_dtype=torch.bfloat16, shard_scale_jitter=False,
                                  bits=lambda name: 4 if "self_attn" in name else 2)
    return base, ptq, d


OPTS = dict(steps=12, seq_len=64, batch=2, n_sequences=2, time_budget_min=None, lr_weights=1e-3, lr_scales=2e-2,
            warmup_steps=1, save_every=4, lm_head_scales="input", seed=0)


def test_qat_loss_falls_and_run_is_deterministic(qat_setup):
    base, ptq, d = qat_setup
    a = run_qat(base, ptq, d / "a", QATOptions(**OPTS))
    first, last = a["losses"][0], a["losses"][-1]
    assert last < 0.7 * first, a["losses"]  # one fixed batch: distillation must make real progress on it
    b = run_qat(base, ptq, d / "b", QATOptions(**OPTS))
    assert a["losses"] == b["losses"]  # same seed, same data, same trajectory
    assert checkpoint_tensors(d / "a").keys() == checkpoint_tensors(d / "b").keys()
    ta, tb = checkpoint_tensors(d / "a"), checkpoint_tensors(d / "b")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_qat_resumes_where_it_stopped(qat_setup):
    base, ptq, d = qat_setup
    opts = QATOptions(**OPTS)
    part = run_qat(base, ptq, d / "r", opts, max_steps=5)  # stops after 5 steps, state saved, no export
    assert part["steps_done"] == 5 and not (d / "r" / "model.safetensors").exists()
    changed = QATOptions(**{**OPTS, "lr_weights": 2 * opts.lr_weights})
    with pytest.raises(ValueError, match=r"other options \(lr_weights\)"):  # a different trajectory: refused
        run_qat(base, ptq, d / "r", changed)
    # the same command continues from step 5; a larger time budget / other save and monitor cadence may be given
    full = run_qat(base, ptq, d / "r", QATOptions(**{**OPTS, "time_budget_min": 60.0, "save_every": 3}))
    straight = run_qat(base, ptq, d / "s", opts)
    assert full["losses"] == straight["losses"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (kernels/run_gpu_checks.sh runs it)")
def test_qat_on_cuda_trains_and_exports(qat_setup):
    """`device: auto` trains on the GPU: the loss falls as on the CPU and the export is the same checkpoint layout
    (same tensor names, dtypes and shapes), written from CPU tensors."""
    base, ptq, d = qat_setup
    g = run_qat(base, ptq, d / "cuda", QATOptions(**OPTS, device="auto"))
    assert g["losses"][-1] < 0.7 * g["losses"][0], g["losses"]
    c = run_qat(base, ptq, d / "cpu", QATOptions(**OPTS, device="cpu"))
    tg, tc = checkpoint_tensors(d / "cuda"), checkpoint_tensors(d / "cpu")
    assert {k: (v.dtype, v.shape) for k, v in tg.items()} == {k: (v.dtype, v.shape) for k, v in tc.items()}
    assert abs(g["losses"][0] - c["losses"][0]) < 0.05 * c["losses"][0]  # same start, same batch (f32 rounding only)


def test_qat_exports_what_it_trained_besides_the_quantized_modules(qat_setup):
    """The norms are trained (lr_norms) and served as bf16 floats: the export writes the trained values, each the
    bf16 rounding of the student's f32 parameter (until 2026-12-03 it kept PTQ's, so the served model was not the
    trained one)."""
    base, ptq, d = qat_setup
    out = d / "norms"
    run_qat(base, ptq, out, QATOptions(**{**OPTS, "lr_norms": 1e-2}))
    trained = torch.load(out / "qat_state.pt", weights_only=False)["student"]
    tq, tp = checkpoint_tensors(out), checkpoint_tensors(ptq)
    norms = [k for k in tp if k.endswith("norm.weight")]
    assert norms and all(k in trained for k in norms)
    for k in norms:
        assert torch.equal(tq[k], trained[k].to(tq[k].dtype)), k
    assert all(not torch.equal(tq[k], tp[k]) for k in norms)


@pytest.mark.parametrize("arch", ["gemma3", "gemma4"])
def test_chunked_head_and_loss_equal_the_whole_batch(arch, qat_setup, qat_setup_gemma4):
    """`distill_backward` with the lm_head + loss in chunks of 16 / 50 tokens (the last one short) equals the
    plain whole-batch `kd_loss(...).backward()` (chunk 0): the same loss and the same gradient of every parameter,
    up to f32 regrouping. Gemma 3: the recipe's frozen table (the int8 `_int_mm` head); Gemma 4: trained table,
    both lm_head scales, final logit soft-capping (30) — a chunk path that skipped the soft-cap, took LSQ's
    gradient scale from the chunk's shape or lost a chunk's gradient fails here by orders of magnitude.
    Tolerance: chunking regroups f32 sums over the batch's 128 tokens; |regrouped - whole| <= n * 2^-24 * sum|terms|.
    The decoder's gradients come from per-token rows of the head's backward, which chunking does not regroup
    (measured bitwise equal); the table's and head_out's gradients sum terms that do not cancel (measured <= 1.3e-7
    of the tensor's largest): bound 1e-5. The lm_head input scale's gradient is ONE sum of 128 x hidden LSQ terms of
    both signs that cancel, so its regrouping error relative to the result is n * 2^-24 * sum|t| / |sum t| (measured
    9e-5 - 4e-4): bound 2e-3. Excluded: the trained table's per-row scale gradient (`row_rel`), sums cancelling to
    ~1e-9 of the others — f32 noise in both paths (measured up to 100 % apart)."""
    from transformers import AutoModelForCausalLM

    from vllm_gemma_mobile.qat.train import build_student, distill_backward

    base, ptq, _ = qat_setup if arch == "gemma3" else qat_setup_gemma4
    opts = QATOptions(**{**OPTS, "train_table": arch == "gemma4", "lm_head_scales": "input" if arch == "gemma3"
                         else "both"})
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    student, _ = build_student(base, ptq, opts, [ids])
    assert (student.config.get_text_config().final_logit_softcapping is not None) == (arch == "gemma4")
    teacher = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    runs = {}
    for chunk in (0, 16, 50):
        student.zero_grad(set_to_none=True)
        loss = distill_backward(student, ids, t_logits, 1.0, chunk)
        runs[chunk] = loss, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    loss0, g0 = runs[0]
    with torch.no_grad():
        assert loss0 == pytest.approx(float(torch.nn.functional.kl_div(
            torch.log_softmax(student(input_ids=ids).logits, -1), torch.log_softmax(t_logits, -1), log_target=True,
            reduction="sum")) / ids.numel(), rel=1e-5)  # chunk 0 is the plain loss (kl_div: an independent formula)
    assert len(g0) > 20
    for chunk in (16, 50):
        loss, g = runs[chunk]
        assert loss == pytest.approx(loss0, rel=1e-6)
        assert g.keys() == g0.keys()
        for name in g0:
            if name.endswith("gm_table.row_rel"):
                continue
            rel = 2e-3 if name.endswith("head_in.rel") else 1e-5
            assert float((g[name] - g0[name]).abs().max()) <= rel * float(g0[name].abs().max()), name


def test_qat_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown QAT option"):
        QATOptions.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="lm_head_scales"):
        QATOptions.from_dict({"lm_head_scales": "output"})
    with pytest.raises(ValueError, match="head_chunk=-1"):
        QATOptions.from_dict({"head_chunk": -1})
    with pytest.raises(ValueError, match="device='tpu'"):
        QATOptions.from_dict({"device": "tpu"})
    assert QATOptions.from_dict({}).torch_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():  # asked for a GPU that is not there: an error, not a silent CPU run
        with pytest.raises(ValueError, match="no CUDA device"):
            QATOptions.from_dict({"device": "cuda"})


def test_qat_checkpoint_is_served_by_vllm(qat_setup):
    """The exported QAT checkpoint (with learned lm_head input scale) loads in vLLM through the plugin unchanged;
    its greedy tokens equal the served-numerics reference (bf16 near-tie rule, fixtures_ckpt.compare_greedy)."""
    base, ptq, d = qat_setup
    out = d / "a"
    if not (out / "model.safetensors").exists():
        run_qat(base, ptq, out, QATOptions(**OPTS))
    cfg = json.loads((out / "config.json").read_text())
    head = cfg["quantization_config"]["gemma_mobile"]["lm_head"]
    assert head["input_scale"] > 0 and head["output_scale"] is None
    from vllm import LLM, SamplingParams

    from vllm_gemma_mobile.evaluate.reference import load_reference

    llm = LLM(str(out), enforce_eager=True, max_model_len=256, dtype="bfloat16", seed=0)
    try:
        from vllm_gemma_mobile.vllm.inspect_model import describe

        info = llm.apply_model(describe)[0]
        assert info["lm_head_act_scales"] == head
        prompts = [[2, 17, 300, 41], [2, 99, 5, 600, 7, 12], [2, 450]]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1))
    finally:
        del llm
    model, _ = load_reference(out)  # served numerics, int8/int4 KV fake quant like the engine's cache
    cases = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
              [dd[t].logprob for t, dd in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]) for o in outs]
    print(compare_greedy(model, cases, max_lp_diff=0.35))


@pytest.fixture(scope="module")
def qat_setup_gemma4(tiny_gemma4, tmp_path_factory):
    from vllm_gemma_mobile.quantize.run import quantize

    d = tmp_path_factory.mktemp("qat4")
    ptq = quantize(tiny_gemma4, REPO / "recipes" / "gemma4_e2b_mobile_ptq.yaml", d / "ptq", num_samples=4, seq_len=64)
    return tiny_gemma4, ptq, d


def test_qat_gemma4_trains_and_is_served_by_vllm(qat_setup_gemma4):
    """Gemma 4 (E2B-like: KV-shared layers with 2-bit double-wide MLPs, a per-layer table): every quantized module is
    trained (linears, the tied table with both lm_head scales, as the Gemma 4 recipe sets) or frozen at its served
    values (the per-layer table: its student rows are the served bf16 rows, and the export keeps its tensors bit for
    bit); the loss falls; vLLM serves the export through the plugin with greedy tokens equal to the reference."""
    from vllm_gemma_mobile.contract import read_contract
    from vllm_gemma_mobile.evaluate.reference import load_reference, served_embedding_rows
    from vllm_gemma_mobile.qat.train import build_student, load_qat_recipe

    base, ptq, d = qat_setup_gemma4
    assert load_qat_recipe(REPO / "recipes" / "gemma4_mobile_qat.yaml").lm_head_scales == "both"
    opts = QATOptions(**{**OPTS, "lm_head_scales": "both"})
    ple = "model.embed_tokens_per_layer"
    student, summary = build_student(base, ptq, opts, [torch.randint(3, 500, (2, 64))])
    assert summary["frozen_tables"] == [ple]
    w = student.get_submodule(ple).weight
    assert not w.requires_grad and torch.equal(w, served_embedding_rows(read_contract(ptq), ple).bfloat16().float())
    out = d / "q"
    r = run_qat(base, ptq, out, opts)
    assert r["losses"][-1] < 0.7 * r["losses"][0], r["losses"]
    tq, tp = checkpoint_tensors(out), checkpoint_tensors(ptq)
    assert tq.keys() == tp.keys()
    assert all(torch.equal(tq[k], tp[k]) for k in tp if k.startswith(ple + "."))
    # the 2-bit double-wide MLP of a KV-shared layer is trained (12 steps move its learned scales; its 2-bit codes
    # need larger steps to cross a rounding boundary)
    assert not torch.equal(tq["model.layers.4.mlp.down_proj.weight_scale"], tp["model.layers.4.mlp.down_proj.weight_scale"])
    head = json.loads((out / "config.json").read_text())["quantization_config"]["gemma_mobile"]["lm_head"]
    assert head["input_scale"] > 0 and head["output_scale"] > 0
    from vllm import LLM, SamplingParams

    llm = LLM(str(out), enforce_eager=True, max_model_len=256, dtype="bfloat16", seed=0)
    try:
        prompts = [[2, 17, 300, 41], [2, 99, 5, 600, 7, 12]]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1))
    finally:
        del llm
    model, _ = load_reference(out)
    cases = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
              [dd[t].logprob for t, dd in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]) for o in outs]
    print(compare_greedy(model, cases, max_lp_diff=0.35))


def test_gemma_mobile_qat_command(qat_setup, capsys):
    """`gemma-mobile qat BASE --init PTQ --out DIR --recipe recipes/gemma3_mobile_qat.yaml --set ...` as a user runs it."""
    from vllm_gemma_mobile.cli import main

    base, ptq, d = qat_setup
    out = d / "cli"
    main(["qat", str(base), "--init", str(ptq), "--out", str(out), "--set", "steps=2", "--set", "seq_len=64",
          "--set", "n_sequences=2", "--set", "time_budget_min=null", "--set", "eval_every=1"])
    rec = json.loads((out / "qat.json").read_text())
    assert rec["steps_done"] == 2 and len(rec["heldout_kl"]) == 3 and rec["options"]["train_table"] is False
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    with pytest.raises(SystemExit, match="unknown QAT option"):
        main(["qat", str(base), "--init", str(ptq), "--out", str(d / "bad"), "--set", "stepz=2"])
