"""suggest_theta: finds a planted valley, refuses unimodal samples, is deterministic."""

import numpy as np
import pytest

from itae_export.calibrate.theta import suggest_theta


def planted(seed=0, n_bulk=2000, n_art=50, bulk=(1.5, 0.2), art=(5.0, 0.5)):
    rng = np.random.default_rng(seed)
    return rng.normal(*bulk, n_bulk), rng.normal(*art, n_art)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_threshold_inside_the_gap(seed):
    bulk, art = planted(seed)
    norms = np.concatenate([bulk, art])
    np.random.default_rng(seed).shuffle(norms)
    s = suggest_theta(norms)
    assert s.bimodal, s.warning
    assert s.warning is None
    # inside the empty gap between the two populations, not merely between their means
    assert bulk.max() < s.theta < art.min(), (bulk.max(), s.theta, art.min())
    assert s.stats["n_above"] == art.size and s.stats["n_below"] == bulk.size
    assert s.confidence > 0.5
    lo, hi = s.stats["components"]
    assert abs(lo["mean_norm"] - 1.5) < 0.1 and abs(hi["mean_norm"] - 5.0) < 0.3
    assert abs(hi["weight"] - 50 / 2050) < 0.01


def test_one_percent_minority_in_a_large_sample():
    # closer to the real case: ~1 % artifact tokens, bulk and artifacts not far apart
    bulk, art = planted(3, n_bulk=25600, n_art=256, bulk=(1.5, 0.3), art=(4.0, 0.5))
    s = suggest_theta(np.concatenate([bulk, art]))
    assert s.bimodal, s.warning
    # the gap is not empty here: most artifacts and almost all of the bulk must be on the right side
    assert (bulk > s.theta).mean() < 0.001
    assert (art > s.theta).mean() > 0.9


@pytest.mark.parametrize(
    "name,sample",
    [
        ("normal", lambda rng: rng.normal(3.0, 0.5, 5000)),
        ("lognormal", lambda rng: rng.lognormal(0.5, 0.6, 5000)),
        ("lognormal-large", lambda rng: rng.lognormal(0.5, 0.4, 100_000)),
        ("gamma", lambda rng: rng.gamma(3.0, 1.0, 5000)),
    ],
)
def test_unimodal_sample_is_not_bimodal(name, sample):
    s = suggest_theta(sample(np.random.default_rng(7)))
    assert not s.bimodal, (name, s.stats)
    assert s.warning and "no bimodality" in s.warning
    assert s.confidence <= 0.2


def test_too_few_artifacts_is_not_bimodal():
    bulk, art = planted(0, n_art=3)
    s = suggest_theta(np.concatenate([bulk, art]))
    assert not s.bimodal
    assert "minority" in s.warning or "valley" in s.warning


def test_deterministic_and_order_independent():
    bulk, art = planted(5)
    norms = np.concatenate([bulk, art])
    a = suggest_theta(norms)
    b = suggest_theta(norms.copy())
    c = suggest_theta(norms[::-1].reshape(2, -1))  # any shape, any order
    assert a.to_dict() == b.to_dict()
    assert a.theta == c.theta and a.bimodal == c.bimodal and a.confidence == c.confidence


def test_ignores_non_finite_and_rejects_tiny_samples():
    bulk, art = planted(0)
    norms = np.concatenate([bulk, art, [np.nan, np.inf, -1.0, 0.0]])
    assert suggest_theta(norms).bimodal
    with pytest.raises(ValueError):
        suggest_theta(np.ones(5))
