"""Pick theta from the norms themselves: the valley of a bimodal histogram (paper Sec. 4.2, Fig. 2).

The paper reads theta off the bimodal histogram of last-block query norms by eye. Here it is
found automatically:

1. work on log-norms (norms are positive and right-skewed; a lognormal bulk becomes symmetric);
2. find the deepest valley of a kernel density estimate whose far side holds enough tokens;
3. fit a 2-component Gaussian mixture (EM started from the split at that valley); theta is the
   minimum of the mixture density between the two means, kept inside the empirical valley;
4. cross-check with Otsu's threshold;
5. call the sample bimodal only when the empirical density really dips (depth and a Poisson
   significance test), the two Gaussians are well separated (Ashman's D > 2), and the minority
   side holds enough tokens. A mixture always has two components; the data need not have two modes.

Plain numpy EM rather than sklearn's GaussianMixture: it is 1-D, needs a chosen start (sklearn's
k-means start splits a skewed bulk instead of finding a 1 % minority), and runs in milliseconds.
Deterministic: fixed seed for the subsample, no random starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

# Bimodality criteria (see docs/pictures.md).
MIN_ASHMAN_D = 2.0  # two Gaussians with D > 2 are cleanly separated
MIN_VALLEY_DEPTH = 0.5  # the empirical density between the modes drops below half the smaller peak
MIN_MINORITY_COUNT = 10
MIN_MINORITY_SHARE = 5e-4
MIN_DIP_Z = 3.0  # the dip must exceed Poisson noise of the counts by 3 sigma
MAX_POINTS = 50_000  # larger samples are subsampled (deterministically) for the fits
GRID = 1024


@dataclass
class ThetaSuggestion:
    """A suggested theta. ``theta`` is always a number; it means something only when ``bimodal``."""

    theta: float
    confidence: float  # 0..1
    method: str
    bimodal: bool
    stats: dict = field(default_factory=dict)
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _kde_on_grid(x: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, float]:
    """Gaussian KDE (Silverman bandwidth) by linear binning + convolution: O(n + G log G)."""
    n = x.size
    sd = float(x.std())
    iqr = float(np.subtract(*np.percentile(x, [75, 25])))
    spread = min(sd, iqr / 1.349) if iqr > 0 else sd
    bw = 0.9 * max(spread, 1e-6) * n ** (-0.2)
    step = grid[1] - grid[0]
    pos = (x - grid[0]) / step
    lo = np.clip(np.floor(pos).astype(np.int64), 0, grid.size - 2)
    frac = np.clip(pos - lo, 0.0, 1.0)
    counts = np.bincount(lo, weights=1 - frac, minlength=grid.size) + np.bincount(lo + 1, weights=frac, minlength=grid.size)
    half = int(math.ceil(4 * bw / step))
    k = np.exp(-0.5 * (np.arange(-half, half + 1) * step / bw) ** 2)
    k /= k.sum() * step
    if 2 * half + 1 <= grid.size:
        dens = np.convolve(counts, k, mode="same")
    else:  # bandwidth wider than the grid: direct evaluation
        dens = np.exp(-0.5 * ((grid[:, None] - grid[None, :]) / bw) ** 2) @ counts / (bw * math.sqrt(2 * math.pi))
    return dens / n, bw


def _otsu(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the split that maximises the between-class variance of a histogram."""
    hist, edges = np.histogram(x, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    i = int(np.argmax(between[:-1]))
    return float(edges[i + 1])


@dataclass
class _Mixture:
    """A 1-D mixture of two Gaussians, component 0 the lower mean."""

    weights: np.ndarray
    means: np.ndarray
    sds: np.ndarray
    loglik: float

    def pdf(self, t: np.ndarray) -> np.ndarray:
        z = (t[:, None] - self.means[None]) / self.sds[None]
        return (self.weights[None] * np.exp(-0.5 * z * z) / (self.sds[None] * math.sqrt(2 * math.pi))).sum(1)

    @property
    def ashman_d(self) -> float:
        return float(math.sqrt(2) * abs(self.means[1] - self.means[0]) / math.sqrt((self.sds**2).sum()))


def _em2(x: np.ndarray, w0, m0, s0, iters: int = 500, tol: float = 1e-9, bins: int = 4096) -> _Mixture:
    """EM for a 2-component 1-D Gaussian mixture from a given start.

    Runs on a fine histogram of ``x`` (``bins`` weighted points), so an iteration costs O(bins),
    not O(n); at 4096 bins the binning error is far below the spread of either component.
    """
    counts, edges = np.histogram(x, bins=bins)
    keep = counts > 0
    c = ((edges[:-1] + edges[1:]) / 2)[keep]
    f = counts[keep] / x.size
    w, m, s = (np.asarray(a, dtype=np.float64).copy() for a in (w0, m0, s0))
    floor = max(float(edges[1] - edges[0]), 1e-6)
    prev = -np.inf
    ll = prev
    for _ in range(iters):
        z = (c[:, None] - m[None]) / s[None]
        logp = np.log(np.maximum(w[None], 1e-300)) - 0.5 * z * z - np.log(s[None])
        top = logp.max(1, keepdims=True)
        ll_i = top[:, 0] + np.log(np.exp(logp - top).sum(1))
        r = np.exp(logp - ll_i[:, None]) * f[:, None]
        nk = r.sum(0) + 1e-15
        w = nk / nk.sum()
        m = (r * c[:, None]).sum(0) / nk
        s = np.sqrt(np.maximum((r * (c[:, None] - m[None]) ** 2).sum(0) / nk, floor**2))
        ll = float((ll_i * f).sum()) - 0.5 * math.log(2 * math.pi)
        if ll - prev < tol:
            break
        prev = ll
    order = np.argsort(m)
    return _Mixture(w[order], m[order], s[order], ll)


def _split_start(x: np.ndarray, t: float):
    lo, hi = x[x <= t], x[x > t]
    sd = float(x.std())
    return ([lo.size / x.size, hi.size / x.size], [lo.mean(), hi.mean()],
            [max(lo.std(), 1e-2 * sd), max(hi.std() if hi.size > 1 else 0.0, 1e-2 * sd)])


def _count_within(x_sorted: np.ndarray, c: float, r: float) -> int:
    return int(np.searchsorted(x_sorted, c + r, side="right") - np.searchsorted(x_sorted, c - r, side="left"))


def _valleys(kde: np.ndarray):
    """Indices of the local minima of a density on a grid (plateaus count once)."""
    d = np.diff(kde)
    out = []
    for i in range(1, kde.size - 1):
        if d[i - 1] < 0 and d[i] >= 0:
            # walk a flat bottom to its middle
            j = i
            while j + 1 < kde.size - 1 and d[j] == 0:
                j += 1
            out.append((i + j) // 2)
    return out


def _bimodality_coefficient(x: np.ndarray) -> float:
    """Pfister et al.'s bimodality coefficient (> 5/9 suggests bimodality or strong skew); stats only."""
    n = x.size
    c = x - x.mean()
    m2 = float((c**2).mean())
    if n < 4 or m2 == 0:
        return float("nan")
    g = float((c**3).mean()) / m2**1.5
    k = float((c**4).mean()) / m2**2 - 3
    return float((g * g + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


def suggest_theta(norms) -> ThetaSuggestion:
    """Suggest theta from a sample of token norms (any shape; NaN, inf and values <= 0 are dropped)."""
    v = np.asarray(norms, dtype=np.float64).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    n_total = int(v.size)
    if n_total < 20:
        raise ValueError(f"suggest_theta needs at least 20 positive finite norms, got {n_total}")
    x_all = np.log(v)
    if x_all.size > MAX_POINTS:  # deterministic subsample for the fits; counts use every point
        x = np.random.default_rng(0).choice(x_all, MAX_POINTS, replace=False)
    else:
        x = x_all
    if float(x.max() - x.min()) < 1e-9:
        return ThetaSuggestion(float(v[0]), 0.0, "constant", False, {"n": n_total},
                               "every norm has the same value: no bimodality")

    x = np.sort(x)
    pad = 0.05 * (x.max() - x.min())
    grid = np.linspace(x.min() - pad, x.max() + pad, GRID)
    kde, bw = _kde_on_grid(x, grid)
    best = _deepest_valley(x, grid, kde, bw, n_total)
    mix, t = _thresholds(x, grid, kde, best)
    theta_log = t["theta"]
    n_below = int((x_all <= theta_log).sum())
    minority = min(n_below, n_total - n_below)
    share = minority / n_total
    valley_depth = best["depth"] if best is not None else 0.0
    dip_z = best["z"] if best is not None else 0.0

    def moved(t_other: float) -> float:
        """Points the other threshold would put on the other side, relative to the minority."""
        a, b = sorted((theta_log, t_other))
        return float(((x > a) & (x <= b)).sum()) / x.size / max(share, 1e-12)

    disagreement = moved(t["kde"])
    # Otsu is a weak check on a 1 % minority (it favours balanced splits): it only costs 10 % when it disagrees
    otsu_agrees = moved(t["otsu"]) < 0.5
    terms = {
        "separation": float(np.clip((mix.ashman_d - MIN_ASHMAN_D) / 2.0, 0, 1)),
        "valley": float(np.clip((valley_depth - MIN_VALLEY_DEPTH) / (1 - MIN_VALLEY_DEPTH), 0, 1)),
        "noise": float(np.clip((dip_z - MIN_DIP_Z) / MIN_DIP_Z, 0, 1)),
        "minority": float(np.clip(share / 0.005, 0, 1)) * float(minority >= MIN_MINORITY_COUNT),
        "agreement": float(np.clip(1 - disagreement, 0, 1)),
    }
    confidence = float(np.prod(list(terms.values())) ** 0.2) * (1.0 if otsu_agrees else 0.9)
    theta = float(math.exp(theta_log))
    reasons = _not_bimodal_reasons(best, valley_depth, dip_z, mix.ashman_d, minority, share)
    warning = None
    if reasons:
        warning = ("no bimodality in the norms: " + "; ".join(reasons) +
                   f". The suggested theta {theta:.3g} is not meaningful; the paper saw no bimodality for DINOv2 "
                   "ViT-S/14 without registers either, and did not apply ITAE there.")
        confidence = min(confidence, 0.2)
    stats = _stats(x, x_all, bw, mix, t, valley_depth, dip_z, disagreement, otsu_agrees, n_below, share, terms)
    return ThetaSuggestion(theta, confidence, "gmm-valley(log-norms), checked by kde-valley and otsu", not reasons,
                           stats, warning)


def _deepest_valley(x: np.ndarray, grid: np.ndarray, kde: np.ndarray, bw: float, n_total: int) -> dict | None:
    """The candidate valley of the empirical density with the deepest dip, whose minority side is populated."""
    best = None
    for vi in _valleys(kde):
        t = float(grid[vi])
        n_lo = int(np.searchsorted(x, t, side="right"))
        minority = min(n_lo, x.size - n_lo)
        if minority < MIN_MINORITY_COUNT * x.size / n_total or minority / x.size < MIN_MINORITY_SHARE:
            continue
        peak_lo, peak_hi = float(kde[: vi + 1].max()), float(kde[vi:].max())
        depth = 1.0 - float(kde[vi]) / max(min(peak_lo, peak_hi), 1e-300)
        # is the dip more than sampling noise? counts within one bandwidth of the smaller peak and of the valley
        p_i = int(np.argmax(kde[: vi + 1])) if peak_lo < peak_hi else vi + int(np.argmax(kde[vi:]))
        n_peak = _count_within(x, grid[p_i], bw)
        n_val = _count_within(x, grid[vi], bw)
        z = (n_peak - n_val) / math.sqrt(max(n_peak + n_val, 1))
        if best is None or depth > best["depth"]:
            best = {"i": vi, "t": t, "depth": depth, "z": z, "n_peak": n_peak, "n_valley": n_val}
    return best


def _thresholds(x: np.ndarray, grid: np.ndarray, kde: np.ndarray, best: dict | None):
    """(two-Gaussian mixture, log thresholds: gmm valley, kde valley, otsu, and the chosen theta).

    The mixture starts from the split at the empirical valley (or from the median and the tail).
    Theta is the mixture's valley when it falls inside the empirical valley's basin, else the
    empirical one."""
    if best is not None:
        mix = _em2(x, *_split_start(x, best["t"]))
    else:
        mix = _em2(x, [0.99, 0.01], [np.quantile(x, 0.5), np.quantile(x, 0.995)], [x.std(), x.std() / 4])
    m_lo, m_hi = mix.means
    idx = np.flatnonzero((grid > m_lo) & (grid < m_hi))
    t_gmm = float(grid[idx[np.argmin(mix.pdf(grid[idx]))]]) if idx.size >= 3 else float((m_lo + m_hi) / 2)
    t_kde = best["t"] if best is not None else t_gmm
    theta = t_gmm
    if best is not None:
        half_depth = kde[best["i"]] + 0.5 * (min(kde[: best["i"] + 1].max(), kde[best["i"]:].max()) - kde[best["i"]])
        basin = np.flatnonzero(kde <= half_depth)
        j = np.searchsorted(grid, t_gmm)
        run_lo, run_hi = best["i"], best["i"]
        while run_lo - 1 >= 0 and kde[run_lo - 1] <= half_depth:
            run_lo -= 1
        while run_hi + 1 < grid.size and kde[run_hi + 1] <= half_depth:
            run_hi += 1
        if basin.size == 0 or not (run_lo <= j <= run_hi):
            theta = t_kde
    return mix, {"gmm": t_gmm, "kde": t_kde, "otsu": _otsu(x), "theta": theta}


def _not_bimodal_reasons(best, valley_depth: float, dip_z: float, ashman_d: float, minority: int,
                         share: float) -> list[str]:
    reasons = []
    if best is None:
        reasons.append("the density of the norms has no valley with enough tokens beyond it")
    else:
        if valley_depth < MIN_VALLEY_DEPTH:
            reasons.append(f"the deepest valley is shallow (depth {valley_depth:.2f} < {MIN_VALLEY_DEPTH})")
        if dip_z < MIN_DIP_Z:
            reasons.append(f"the dip is within sampling noise (z {dip_z:.1f} < {MIN_DIP_Z})")
    if ashman_d <= MIN_ASHMAN_D:
        reasons.append(f"the two fitted Gaussians overlap (Ashman's D {ashman_d:.2f} <= {MIN_ASHMAN_D})")
    if minority < MIN_MINORITY_COUNT or share < MIN_MINORITY_SHARE:
        reasons.append(f"the minority side holds only {minority} tokens ({share:.3%})")
    return reasons


def _stats(x, x_all, bw, mix, t: dict, valley_depth: float, dip_z: float, disagreement: float, otsu_agrees: bool,
           n_below: int, share: float, terms: dict) -> dict:
    """The record of how the suggestion was reached (ThetaSuggestion.stats)."""
    return {
        "n": int(x_all.size),
        "n_fit": int(x.size),
        "space": "log-norm",
        "components": [
            {"mean_norm": float(math.exp(mix.means[i])), "mean_log": float(mix.means[i]),
             "sd_log": float(mix.sds[i]), "weight": float(mix.weights[i])}
            for i in (0, 1)
        ],
        "ashman_d": mix.ashman_d,
        "valley_depth": float(valley_depth),
        "dip_z": float(dip_z),
        "kde_bandwidth_log": float(bw),
        "bimodality_coefficient": _bimodality_coefficient(x),
        "theta_gmm_valley": float(math.exp(t["gmm"])),
        "theta_kde_valley": float(math.exp(t["kde"])),
        "theta_otsu": float(math.exp(t["otsu"])),
        "threshold_disagreement": float(disagreement),
        "otsu_agrees": bool(otsu_agrees),
        "n_below": n_below,
        "n_above": int(x_all.size) - n_below,
        "minority_share": float(share),
        "confidence_terms": terms,
        "norm_quantiles": {q: float(np.exp(np.quantile(x_all, float(q)))) for q in ("0.01", "0.5", "0.99", "0.999")},
    }
