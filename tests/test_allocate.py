"""`--size-budget` bit allocation (quantize/allocate.py): sizes, the knapsack, and a real run on a tiny Gemma 3."""

import itertools
import json
import struct
from pathlib import Path

import pytest

from vllm_gemma_mobile.quantize.allocate import BITS, Unit, parse_size, solve

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_parse_size():
    assert parse_size("150MB") == 150_000_000
    assert parse_size("1.5GiB") == 3 * 2 ** 29
    assert parse_size("2e6") == 2_000_000 and parse_size(1234) == 1234
    for bad in ("", "ten MB", "-5MB", "0"):
        with pytest.raises(ValueError, match="size budget"):
            parse_size(bad)


def _units():
    return [Unit("embed", ["e"], [(1000, 64)], False), Unit("attention.0", ["a"], [(96, 64)], True),
            Unit("mlp.0", ["m"], [(256, 64), (64, 128)], True), Unit("mlp.1", ["m1"], [(256, 64)], True)]


def test_unit_bytes_are_what_the_checkpoint_stores():
    """packed int32 codes (ceil(K * b / 32) words per row), a bf16 scale per row, the int64 shape, and for linears
    the bf16 input and output scales."""
    u = Unit("x", ["x"], [(10, 70)], True)
    assert u.bytes_at(2) == 10 * 5 * 4 + 10 * 2 + 16 + 4
    assert u.bytes_at(8) == 10 * 18 * 4 + 10 * 2 + 16 + 4


@pytest.mark.parametrize("budget_frac", [0.0, 0.3, 0.6, 1.0])
def test_knapsack_is_the_brute_force_optimum(budget_frac):
    """Every one of the 3^4 maps is enumerated: the solver's map fits and no fitting map has a lower total KL.
    (The solver rounds costs UP to 1/4096 of the free budget, so a map within 4 cells of the limit may be left
    out: the brute force is given the same rounded costs' feasibility.)"""
    units = _units()
    sens = {"embed": {2: 3.0, 4: 0.5, 8: 0.01}, "attention.0": {2: 1.0, 4: 0.2, 8: 0.0},
            "mlp.0": {2: 2.0, 4: 0.1, 8: 0.02}, "mlp.1": {2: 0.4, 4: 0.05, 8: 0.0}}
    rest = 500
    lo = rest + sum(u.bytes_at(2) for u in units)
    hi = rest + sum(u.bytes_at(8) for u in units)
    budget = int(lo + budget_frac * (hi - lo)) + 64
    choice = solve(units, sens, rest, budget)
    size = rest + sum(u.bytes_at(choice[u.name]) for u in units)
    assert size <= budget
    got = sum(sens[u.name][choice[u.name]] for u in units)
    step = (budget - rest) / 4096
    best = min(sum(sens[u.name][b] for u, b in zip(units, combo))
               for combo in itertools.product(BITS, repeat=len(units))
               if sum(-(-u.bytes_at(b) // step) for u, b in zip(units, combo)) <= 4096)
    assert got == pytest.approx(best, abs=1e-12)


def test_budget_below_the_smallest_map_is_refused():
    units = _units()
    with pytest.raises(ValueError, match="too small"):
        solve(units, {u.name: {b: 0.0 for b in BITS} for u in units}, 500, 600)
    with pytest.raises(ValueError, match="below the unquantized rest"):
        solve(units, {u.name: {b: 0.0 for b in BITS} for u in units}, 500, 400)


def test_size_budget_run_writes_the_chosen_bits_and_fits(tiny_gemma3, tmp_path):
    """A real `quantize(..., size_budget=...)` on the tiny Gemma 3: allocation.json is written, the checkpoint's
    bits are the chosen map, the safetensors payload is exactly the predicted bytes (file = 8-byte length + JSON
    header + payload) and within the budget; a budget between the all-2 and all-8 sizes mixes widths."""
    from safetensors import safe_open

    from vllm_gemma_mobile.quantize.allocate import measure_sensitivity
    from vllm_gemma_mobile.quantize.run import quantize

    units, sens, rest = measure_sensitivity(tiny_gemma3, tokens=128, seq_len=64)
    assert all(sens[u.name][8] < sens[u.name][2] for u in units), sens
    lo = rest + sum(u.bytes_at(2) for u in units)
    hi = rest + sum(u.bytes_at(8) for u in units)
    budget = (lo + hi) // 2
    out = quantize(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", tmp_path / "q", num_samples=4, seq_len=64,
                   size_budget=budget)
    rep = json.loads((out / "allocation.json").read_text())
    assert rep["budget_bytes"] == budget and rep["predicted_bytes"] <= budget
    assert len(set(rep["choice"].values())) > 1, rep["choice"]
    f = out / "model.safetensors"
    header = struct.unpack("<Q", f.read_bytes()[:8])[0]
    assert f.stat().st_size - 8 - header == rep["predicted_bytes"] == rep["actual_safetensors_bytes"] - 8 - header
    with safe_open(f, "pt") as st:
        for u in units:
            for m, (n, k) in zip(u.modules, u.shapes):
                words = st.get_slice(f"{m}.weight_packed").get_shape()[1]
                assert words == -(-k * rep["choice"][u.name] // 32), (m, words)
    with pytest.raises(ValueError, match="chooses"):
        quantize(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", tmp_path / "q2", size_budget=budget,
                 overrides={"embed_bits": 4})


def test_size_budget_refuses_gemma4_from_its_config_alone(tiny_gemma4, tmp_path):
    """The model_type check runs on config.json before any weights are read: a Gemma 4 directory holding only its
    config (no safetensors) gets the Gemma-3-only message, not a missing-weights error from the loader."""
    import shutil

    from vllm_gemma_mobile.quantize.allocate import measure_sensitivity

    shutil.copy(Path(tiny_gemma4) / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="Gemma 3 bits only.*gemma4"):
        measure_sensitivity(tmp_path, tokens=64, seq_len=64)
