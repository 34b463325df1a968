"""The vLLM plugin's tensor work (`kernels/plugin.py`, vLLM-free) on the Triton backend vs the torch reference
backend: the same check `kernels/run_gpu_checks.sh` runs compiled on CUDA, here through the Triton interpreter
(`kernels.plugin_check --small`). Bitwise where the contract is integer-exact; bounds derived in its docstring."""

from __future__ import annotations

import pytest
import torch

from kernels import plugin, plugin_check


def test_plugin_path_triton_equals_reference_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rep = plugin_check.run(torch.device("cpu"), small=True)
    assert rep["ok"], rep["cases"]
    for case in rep["cases"]:
        assert case["logits_int8_head_equal"] and case["embedding_equal"] and case["tp_logits_equal"]


def test_plugin_check_catches_a_wrong_output_scale():
    """The comparison is not vacuous: one shard's output scale changed by 1 % changes the logits."""
    st = plugin_check.build(torch.device("cpu"), small=True)
    cfg = st["cfg"]
    ids = torch.arange(16)
    good = plugin_check.forward(plugin_check.prepare(st, "torch"), cfg, ids)
    st["layers"][0]["qkv"]["output_scale"] = st["layers"][0]["qkv"]["output_scale"] * torch.tensor([1.0, 1.01, 1.0])
    bad = plugin_check.forward(plugin_check.prepare(st, "torch"), cfg, ids)
    assert not torch.equal(good, bad)


def test_prepare_linear_groups_shards_by_input_scale():
    """Fused shards with different static input scales get their own GEMM each; equal ones share one."""
    g = torch.Generator().manual_seed(0)
    _, t = plugin_check._rand_ct_linear(g, [64, 32, 32], 96, 4, torch.device("cpu"))
    t["input_scale"] = torch.tensor([0.05, 0.03, 0.03])
    st = plugin.prepare_linear(t["weight_packed"], t["weight_scale"], t["input_scale"], t["output_scale"],
                               t["shards"], t["k"], t["bits"], "torch")
    assert [(a, b) for a, b, _ in st.groups] == [(0, 64), (64, 128)]
    assert st.output_scale.shape == (128,)  # different per-shard output scales: one per column
    x = torch.randn(3, 96, generator=g).bfloat16()
    y = plugin.linear_apply(st, x)
    from kernels import reference as R
    from kernels.layout import from_compressed_tensors

    w = from_compressed_tensors(t["weight_packed"], 4, (128, 96))
    for (a, b, sx) in st.groups:  # each group == the reference linear on its rows with its own input scale
        yr = R.linear(x, w.narrow_rows(a, b - a), t["weight_scale"][a:b], sx, st.output_scale[a:b])
        assert torch.equal(y[:, a:b], yr)
