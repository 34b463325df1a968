"""`static_mse` (quantize/observers.py): the least-squared-error static range over every calibration value."""

import pytest
import torch

from vllm_gemma_mobile.quantize.observers import CLIP_RATIOS, NBINS, StaticMSEObserver, mse_clip
from vllm_gemma_mobile.scheme.spec import activation_args, kv_args, weight_args


def _brute_force(values: torch.Tensor, absmax: float, q_max: int) -> torch.Tensor:
    """Squared error of every candidate clip over the raw |values| (f64), the module docstring's formula."""
    v = values.double().abs()
    errs = []
    for c in (CLIP_RATIOS * absmax).tolist():
        s = c / (q_max + 0.5)  # compressed-tensors' symmetric scale of the range -c..c
        errs.append(float(((torch.clamp(torch.round(v / s), max=q_max) * s - v) ** 2).sum()))
    return torch.tensor(errs, dtype=torch.float64)


@pytest.mark.parametrize("q_max", [127, 7])
def test_mse_clip_is_the_brute_force_minimum_on_bin_centres(q_max):
    """Values placed exactly on bin centres: the histogram loses nothing, so the chosen clip must be the brute-force
    argmin over the raw values (errors compared, not indices: equal errors may resolve either way in f64 sums;
    relative slack 1e-12 covers the two summation orders of <= 2^17 f64 terms)."""
    g = torch.Generator().manual_seed(0)
    edge = 8.0
    bins = torch.clamp((torch.randn(1 << 17, generator=g).abs() ** 2 * 300).long(), max=NBINS - 1)
    values = (bins.double() + 0.5) * (edge / NBINS) * torch.where(torch.rand(bins.shape, generator=g) < 0.5, -1, 1)
    hist = torch.bincount(bins, minlength=NBINS).double()
    absmax = float(values.abs().max())
    c = mse_clip(hist, edge, absmax, q_max)
    errs = _brute_force(values, absmax, q_max)
    chosen = int(torch.argmin((CLIP_RATIOS * absmax - c).abs()))
    assert abs(float(CLIP_RATIOS[chosen]) * absmax - c) == 0.0
    assert float(errs[chosen]) <= float(errs.min()) * (1 + 1e-12)
    assert c < absmax  # heavy tail: the MSE range clips (min/max would not)


def test_streaming_histogram_equals_one_histogram_of_everything():
    """Observing in batches whose maxima grow (edge doubles, bins merge) gives the same counts as one histogram of
    all values at the final edge: bin boundaries are dyadic, so merged pairs are exactly the coarse bins."""
    g = torch.Generator().manual_seed(1)
    obs = StaticMSEObserver(base_name="input", args=activation_args("static_mse"))
    batches = [torch.randn(1, 64, 32, generator=g) * (4.0 ** i) for i in range(4)]
    for b in batches:
        obs(b)
    allv = torch.cat([b.reshape(-1) for b in batches]).abs()
    assert obs.edge >= float(allv.max()) and obs.absmax == float(allv.max())
    want = torch.histc(allv, bins=NBINS, min=0.0, max=obs.edge).double()
    assert torch.equal(obs.hist, want)
    assert float(obs.hist.sum()) == allv.numel()


def test_one_outlier_does_not_set_the_scale():
    """100k N(0, 1) values and one at 20: min/max would make the int8 step 20/127.5; the MSE range clips the
    outlier: at c = 10 the rounding error is ~(10/127)^2/12 * 1e5 = 52 plus the outlier's (20 - 10)^2 = 100, far
    below the ~207 of c = 20 (the error is a sum of squares, so a far larger outlier would rightly be kept)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 100_000, 1, generator=g)
    x[0, 123, 0] = 20.0
    obs = StaticMSEObserver(base_name="input", args=activation_args("static_mse"))
    obs(x.reshape(1, -1, 1000))
    c = float(obs.max_vals.reshape(-1)[0])
    assert c == -float(obs.min_vals.reshape(-1)[0])
    assert 5.0 < c < 14.0, c
    scale = float(obs.get_qparams()["scale"].reshape(-1)[0])
    assert scale == pytest.approx(c / 127.5, rel=1e-6)  # compressed-tensors' rule = the scale mse_clip scored


def test_int4_kv_uses_its_own_code_range():
    """The same values under 4-bit args clip relatively harder than under 8-bit ones (q_max 7 vs 127)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 50_000, 1, generator=g).reshape(1, -1, 500) ** 3
    c8 = StaticMSEObserver(base_name="k", args=kv_args(8, "static_mse"))
    c4 = StaticMSEObserver(base_name="k", args=kv_args(4, "static_mse"))
    assert c4.q_max == 7 and c8.q_max == 127
    c8(x), c4(x)
    assert float(c4.max_vals.max()) < float(c8.max_vals.max()) <= float(x.abs().max())


def test_refuses_per_channel_weights():
    with pytest.raises(ValueError, match="per-tensor symmetric"):
        StaticMSEObserver(base_name="weight", args=weight_args(4, "static_mse"))


def test_range_is_searched_on_read_and_follows_later_batches():
    """The search runs when max_vals is read, on the histogram as it is then: reading after each batch gives the range
    of everything observed so far (a later, wider batch moves it), and the value equals mse_clip on that histogram —
    what the eager version (a search after every batch) returned. Nothing observed: no statistics, no range."""
    g = torch.Generator().manual_seed(4)
    obs = StaticMSEObserver(base_name="input", args=activation_args("static_mse"))
    assert not obs.has_statistics
    with pytest.raises(AttributeError):  # (nn.Module turns the property's error into its own message)
        obs.max_vals
    seen = []
    for i in range(3):
        b = (torch.randn(1, 64, 32, generator=g) * (3.0 ** i)).to(torch.bfloat16)
        obs(b)
        seen.append(b.float().abs().reshape(-1))
        want = mse_clip(torch.histc(torch.cat(seen), bins=NBINS, min=0.0, max=obs.edge).double(), obs.edge,
                        float(torch.cat(seen).max()), obs.q_max)
        got = obs.max_vals
        assert obs.has_statistics and got.dtype == torch.bfloat16 and got.shape == (1,)
        assert float(got) == float(torch.tensor(want, dtype=torch.bfloat16)) and torch.equal(obs.min_vals, -got)
    assert float(obs.max_vals) > 3.0  # the last batch (std 9) widened the range
