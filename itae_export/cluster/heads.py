"""Clustering heads trained on frozen embeddings: TSP (linear, neighbour consistency) and TEMI.

Both heads map an embedding [B, D] to cluster probabilities [B, k]; the returned
``torch.nn.Module`` includes the L2 normalisation, so it can be exported after the encoder.

* TSP (Sec. 3.2 and App. A of "Deep clustering with a ViT pretrained on a large dataset"): a
  one-layer head initialised from K-Means centres, trained with a Gaussian-weighted neighbour
  consistency loss over the K nearest neighbours minus lambda times the entropy of the mean
  prediction. By default several heads train side by side, each from its own K-Means run, and
  the one of lowest loss on all the data is kept; each is a cosine layer at a fixed temperature
  (``temperature=None``: the paper's plain linear layer). See docs/heads.md.
* TEMI (Adaloglou et al., BMVC 2023): H MLP heads, student/teacher with EMA, beta-PMI loss over
  pairs (x, x') with x' drawn from the 50 nearest neighbours of x, each pair weighted by the
  teacher ensemble's agreement.

torch is imported inside the functions only, so ``import itae_export`` stays light.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from itae_export.cluster.metrics import l2_normalize
from itae_export.errors import InputError
from itae_export.runtime import available_cores

METHODS = ("tsp", "temi")

# Sec. 4.1 of the TSP paper, except the schedule, the learning rate, the cosine layer and the
# heads side by side (see docs/heads.md): the paper's 100 epochs of 256 on CIFAR (50,000 images)
# are ~20,000 Adam steps at lr 1e-4; a collection of 2,000 gets 800 steps from 100 epochs and the
# head barely leaves its K-Means initialisation. ``epochs=None`` runs
# max(min_epochs, ceil(min_steps / steps per epoch)) epochs.
TSP_DEFAULTS: dict[str, Any] = {
    "n_neighbors": 20,     # K of eq. (4)
    "sigma_rank": 3,       # sigma_i = half the distance to the 3rd nearest neighbour ([29] in the paper)
    "entropy_weight": 3.0,  # lambda of eq. (5)
    "lr": 1e-3,            # Adam (the paper: 1e-4 over ~20,000 steps)
    "batch_size": 256,
    "epochs": None,        # None: the schedule below; an int runs exactly that many epochs
    "min_epochs": 100,     # the paper's epochs
    "min_steps": 2000,     # at least this many optimiser steps, however small the collection
    "init": "kmeans",      # "kmeans" (App. A) or "random"
    "n_heads": 10,         # heads trained side by side, each from its own K-Means run; the lowest loss is kept
    "kmeans_n_init": 1,    # K-Means restarts behind each head's initialisation (10 heads x 1 = the old 1 x 10)
    "temperature": 0.05,   # cosine layer: logits = cos(x, w_c) / temperature; None: the paper's linear layer
}

# The poster gives beta in (0.5, 1], 50 heads, 50-NN pairs and 3-layer MLP heads; the other
# values follow the official TEMI code's defaults (DINO-style self-distillation) as far as known.
# Heads and steps are cut to what a CPU does in seconds (issue 24, docs/heads.md): the poster's 50
# heads of 512 cost ~85 GFLOP a step on 384-d embeddings, about 45 minutes for 2,000 steps on 2
# cores; 4 heads of 128 for 1,000 steps reached the same ACC on digits (85.4 % against K-Means 78.7 %).
TEMI_DEFAULTS: dict[str, Any] = {
    "n_heads": 4,          # the poster: 50
    "n_neighbors": 50,
    "beta": 0.6,
    "hidden_dim": 128,     # the official code: 512
    "epochs": None,        # None: max(min_epochs, ceil(min_steps / steps per epoch))
    "min_epochs": 200,
    "min_steps": 1000,
    "batch_size": 256,
    "lr": 1e-3,             # AdamW (the official code: 1e-4 over tens of thousands of steps)
    "weight_decay": 1e-4,
    "student_temp": 0.1,
    "teacher_temp": 0.1,
    "teacher_momentum": 0.9,  # EMA of the teacher weights, cosine schedule to 1 (official: 0.996)
    "probs_momentum": 0.9,      # EMA of the teacher's cluster marginal q~_t(c)
}


def schedule(n: int, batch_size: int, epochs: int | None, min_epochs: int, min_steps: int) -> dict[str, int]:
    """Epochs and optimiser steps of a fit on ``n`` points: {epochs, steps_per_epoch, steps}.

    ``epochs`` given: exactly that many. ``None``: enough epochs for ``min_steps`` optimiser
    steps, and never fewer than ``min_epochs`` (the paper's), so large collections keep the
    paper's schedule and small ones still get ``min_steps`` updates.
    """
    if n < 1 or batch_size < 1:
        raise InputError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    per_epoch = math.ceil(n / batch_size)
    if epochs is None:
        if min_epochs < 0 or min_steps < 0:
            raise InputError(f"min_epochs and min_steps must be >= 0, got {min_epochs}, {min_steps}")
        epochs = max(min_epochs, math.ceil(min_steps / per_epoch))
    elif epochs < 0:
        raise InputError(f"epochs must be >= 0, got {epochs}")
    return {"epochs": int(epochs), "steps_per_epoch": per_epoch, "steps": int(epochs) * per_epoch}


@dataclass
class HeadResult:
    """What :func:`fit_head` returns. ``head`` maps embedding [B, D] -> probabilities [B, k]."""

    labels_: np.ndarray
    probs_: np.ndarray
    head: Any
    history: list[dict] = field(default_factory=list)
    method: str = ""
    hparams: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    threads: dict = field(default_factory=dict)  # {threads, seconds_per_step {n: s}, estimate_s, seconds}


# ----------------------------------------------------------------------------- neighbours


def nearest_neighbors(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """K nearest neighbours of each row of L2-normalised ``x``, excluding the row itself.

    Returns (distances [N, k] Euclidean, indices [N, k]), nearest first. Euclidean distance on
    unit vectors orders like cosine (d^2 = 2 - 2 cos). Uses faiss when importable.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 1 <= k < n:
        raise InputError(f"need 1 <= n_neighbors < number of embeddings, got {k} with {n} embeddings")
    try:
        import faiss  # type: ignore

        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        d2, idx = index.search(x, k + 1)
        dist = np.sqrt(np.maximum(d2, 0.0))
    except ImportError:
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x).kneighbors(x)
    # Drop the query itself; with duplicate points it need not sit in column 0.
    own = idx == np.arange(n)[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(n), drop] = False
    return dist[keep].reshape(n, k).astype(np.float64), idx[keep].reshape(n, k)


def tsp_neighbor_weights(dist: np.ndarray, sigma_rank: int = 3) -> np.ndarray:
    """Eq. (4): P(j|i) proportional to exp(-d_ij^2 / (2 sigma_i^2)) over the K neighbours.

    sigma_i is half the distance from i to its ``sigma_rank``-th nearest neighbour.
    """
    r = min(sigma_rank, dist.shape[1]) - 1
    sigma = np.maximum(0.5 * dist[:, r:r + 1], 1e-8)
    logits = -(dist ** 2) / (2 * sigma ** 2)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- losses


def tsp_loss(p_anchor, p_neighbors, weights, entropy_weight: float):
    """Eq. (5) on one batch; returns (total, consistency, entropy).

    p_anchor [B, k], p_neighbors [B, K, k], weights [B, K] (rows of P(j|i), summing to 1).
    consistency = -mean_i sum_j P(j|i) log <p_i, p_j>;  entropy = H(mean_i p_i) (natural log).
    """
    total, consistency, entropy = tsp_head_losses(p_anchor.unsqueeze(1), p_neighbors.unsqueeze(2), weights,
                                                  entropy_weight)
    return total[0], consistency[0], entropy[0]


def tsp_head_losses(p_anchor, p_neighbors, weights, entropy_weight: float):
    """Eq. (5) for H heads at once: p_anchor [B, H, k], p_neighbors [B, K, H, k], weights [B, K];
    returns (total, consistency, entropy), each [H]."""
    import torch

    # An elementwise product and a sum over the k clusters: as an einsum this is B H tiny batched
    # matmuls, which cost more than the head's GEMM itself.
    dots = (p_anchor.unsqueeze(1) * p_neighbors).sum(dim=-1)  # [B, K, H]
    consistency = -(weights[:, :, None] * torch.log(dots.clamp_min(1e-12))).sum(dim=1).mean(dim=0)
    entropy = _entropy(p_anchor.mean(dim=0))  # of each head's marginal [H, k]
    return consistency - entropy_weight * entropy, consistency, entropy


def _entropy(marginal):
    """H(marginal) along the last dimension, natural log."""
    import torch

    return -(marginal * torch.log(marginal.clamp_min(1e-12))).sum(dim=-1)


def beta_pmi(p_student, p_teacher, marginal, beta: float):
    """Per-pair TEMI loss L(x, x') = -log sum_c (q_s(c|x) q_t(c|x'))^beta / q~_t(c).

    p_student, p_teacher [..., B, k]; marginal [..., 1, k]. Returns [..., B].
    """
    import torch

    return -torch.log((((p_student * p_teacher) ** beta) / marginal).sum(dim=-1).clamp_min(1e-30))


def temi_loss(s1, s2, t1, t2, marginal, beta: float):
    """TEMI loss (eq. 5 of the poster), symmetrised over the pair as in the official code.

    s1, s2: student probabilities of x and x' [H, B, k]; t1, t2: teacher probabilities [H, B, k];
    marginal [H, 1, k]. The weight w(x, x') = mean_j sum_c t_j(c|x) t_j(c|x') is shared by all
    heads (teacher ensemble) and carries no gradient. Returns (loss, per-head loss [H]).
    """
    weight = (t1 * t2).sum(dim=-1).mean(dim=0).detach()  # [B]
    pair = 0.5 * beta_pmi(s1, t2, marginal, beta) + 0.5 * beta_pmi(s2, t1, marginal, beta)  # [H, B]
    per_head = (weight * pair).mean(dim=1)
    return per_head.mean(), per_head


# ----------------------------------------------------------------------------- head modules


def _modules():
    """The head classes, built on first use so that torch is imported lazily."""
    # Long by design: the class definitions themselves live here, inside the one function that
    # may import torch; splitting them would only spread the lazy import over several functions.
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    import torch
    from torch import nn
    from torch.nn import functional as F

    class LinearClusterHead(nn.Module):
        """TSP head: softmax(W (sqrt(D) x / ||x||) + b).

        The sqrt(D) puts the unit vector back on the per-coordinate scale of raw features
        (coordinates of RMS 1), the scale App. A's initialisation W_i = C_i / (||C_i|| sqrt(D))
        is written for: its initial logits are then the cosines to the K-Means centres.
        """

        def __init__(self, dim: int, k: int):
            super().__init__()
            self.linear = nn.Linear(dim, k)
            self.scale = math.sqrt(dim)

        def logits(self, x):
            return self.linear(F.normalize(x, dim=-1) * self.scale)

        def forward(self, x):
            return torch.softmax(self.logits(x), dim=-1)

    class CosineClusterHead(nn.Module):
        """TSP head with a cosine layer: softmax(cos(x, w_c) / temperature), no bias.

        The logits are bounded by 1 / temperature, so the predictions cannot harden without limit
        as a plain linear layer's do (whose weights grow until boundary points stop moving)."""

        def __init__(self, dim: int, k: int, temperature: float):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(k, dim))
            nn.init.normal_(self.weight)
            self.temperature = float(temperature)

        def logits(self, x):
            return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T / self.temperature

        def forward(self, x):
            return torch.softmax(self.logits(x), dim=-1)

    class MultiMLPHead(nn.Module):
        """H independent 3-layer MLPs on sqrt(D) x / ||x||, each ending in a cosine layer.

        As the DINO head of the official TEMI code, the last layer is weight-normalised and sees
        the L2-normalised hidden state, so the logits are cosines in [-1, 1] and the softmax
        temperature (0.1) sets their scale: a plain last layer starts with logits near 0,
        uniform predictions, and the PMI loss has no gradient to leave them. The sqrt(D) puts
        the unit vector on the per-coordinate scale that PyTorch's initialisation assumes.
        The first layers of all heads are one [D, H * hidden] matrix (one GEMM over the
        batch); the second and last layers are batched matmuls, the bias fused in (baddbmm).
        """

        def __init__(self, dim: int, k: int, n_heads: int, hidden: int):
            super().__init__()
            self.n_heads, self.hidden, self.scale = n_heads, hidden, math.sqrt(dim)
            self.w1 = nn.Parameter(torch.empty(dim, n_heads * hidden))
            self.b1 = nn.Parameter(torch.zeros(n_heads * hidden))
            self.w2 = nn.Parameter(torch.empty(n_heads, hidden, hidden))
            self.b2 = nn.Parameter(torch.zeros(n_heads, 1, hidden))
            self.w3 = nn.Parameter(torch.empty(n_heads, hidden, k))
            for w, fan_in in ((self.w1, dim), (self.w2, hidden), (self.w3, hidden)):
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(w, -bound, bound)

        def forward(self, x):  # [B, D] -> logits [H, B, k], cosines
            b = x.shape[0]
            h = torch.addmm(self.b1, F.normalize(x, dim=-1) * self.scale, self.w1)  # [B, H * hidden]
            h = F.gelu(h).view(b, self.n_heads, self.hidden).transpose(0, 1)  # [H, B, hidden]
            h = F.normalize(F.gelu(torch.baddbmm(self.b2, h, self.w2)), dim=-1)
            return torch.bmm(h, F.normalize(self.w3, dim=1))

        def head_weights(self, i: int):
            """(w1 [D, hidden], b1, w2 [hidden, hidden], b2, w3 [hidden, k] column-normalised) of head i."""
            sl = slice(i * self.hidden, (i + 1) * self.hidden)
            return (self.w1[:, sl], self.b1[sl], self.w2[i], self.b2[i, 0], F.normalize(self.w3[i], dim=0))

    class MLPClusterHead(nn.Module):
        """One TEMI head (the selected teacher head): softmax(cos(MLP(sqrt(D) x / ||x||), W3) / temperature)."""

        def __init__(self, dim: int, k: int, hidden: int, temperature: float):
            super().__init__()
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, hidden)
            self.fc3 = nn.Linear(hidden, k, bias=False)  # rows of unit norm
            self.scale = math.sqrt(dim)
            self.temperature = float(temperature)

        def logits(self, x):
            h = F.gelu(self.fc1(F.normalize(x, dim=-1) * self.scale))
            return self.fc3(F.normalize(F.gelu(self.fc2(h)), dim=-1))

        def forward(self, x):
            return torch.softmax(self.logits(x) / self.temperature, dim=-1)

        @classmethod
        def from_multi(cls, multi: "MultiMLPHead", i: int, temperature: float) -> "MLPClusterHead":
            w1, b1, w2, b2, w3 = multi.head_weights(i)
            head = cls(w1.shape[0], w3.shape[1], multi.hidden, temperature)
            with torch.no_grad():
                head.fc1.weight.copy_(w1.T)
                head.fc1.bias.copy_(b1)
                head.fc2.weight.copy_(w2.T)
                head.fc2.bias.copy_(b2)
                head.fc3.weight.copy_(w3.T)
            return head

    _MODULES = {"LinearClusterHead": LinearClusterHead, "CosineClusterHead": CosineClusterHead,
                "MultiMLPHead": MultiMLPHead, "MLPClusterHead": MLPClusterHead}
    return _MODULES


_MODULES = None


def __getattr__(name):  # LinearClusterHead etc. importable by name, still lazily
    if name in ("LinearClusterHead", "CosineClusterHead", "MultiMLPHead", "MLPClusterHead"):
        return _modules()[name]
    raise AttributeError(name)


def temi_step_flops(n_rows: int, dim: int, k: int, n_heads: int, hidden: int) -> float:
    """Matrix-product FLOPs (2 x multiply-adds) of one TEMI step on ``n_rows`` rows (x and x').

    Student forward and teacher forward: each D*h + h*h + h*k per head and row. Backward of
    the student: weight gradients of all three layers, input gradients of layers 2 and 3 (the
    embeddings need none).
    """
    l1, l2, l3 = dim * hidden, hidden * hidden, hidden * k
    per_row_head = 2 * (l1 + l2 + l3) + (l1 + 2 * l2 + 2 * l3)
    return 2.0 * n_rows * n_heads * per_row_head


def tsp_step_flops(n_rows: int, dim: int, k: int, n_heads: int = 1) -> float:
    """Matrix-product FLOPs of one TSP step on ``n_rows`` distinct rows and ``n_heads`` heads:
    the forward and the weight gradient (the embeddings need no gradient)."""
    return 2.0 * n_rows * dim * k * n_heads * 2


# ----------------------------------------------------------------------------- threads and the estimate

#: Steps timed per thread count (after one warm-up step each), interleaved, on throwaway state.
TRIAL_STEPS = 4
#: Below this many optimiser steps the trial would cost more than any choice saves: one thread.
MIN_STEPS_TO_MEASURE = 60
#: The set-up (scikit-learn K-Means starts of the TSP heads, the neighbour graph) runs on one thread
#: below this many points: its OpenMP chunks are too few to pay for a second thread's barriers.
SETUP_ONE_THREAD_BELOW = 20_000


def thread_candidates(cores: int) -> list[int]:
    """The thread counts the trial compares: one, half the cores and all of them."""
    return sorted({1, max(1, cores // 2), max(1, cores)})


@contextlib.contextmanager
def thread_limits(n: int):
    """torch's intra-op threads and every BLAS/OpenMP pool (numpy, scipy, scikit-learn, faiss) at
    ``n`` together, restored on exit. Two pools of two threads each on two busy cores is what made
    a TSP fit 12x slower than with OMP_NUM_THREADS=1 (issue 24)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits(limits=n):
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def choose_threads(step: Callable[[], Any], state: list, total_steps: int, threads: int | None = None,
                   cores: int | None = None) -> dict:
    """Time ``step`` (one optimiser step on throwaway state) at each candidate thread count and pick
    the fastest: {threads, seconds_per_step {n: median s}, estimate_s}.

    The steps are interleaved (1, 2, 1, 2, ...) so that a change in the machine's load hits every
    candidate alike. ``state``: the tensors the step changes (weights, EMA buffers); they are put
    back afterwards, so the fit proper starts from the same point whatever was measured.
    ``threads`` given: only that count is timed (for the estimate). Fewer than
    :data:`MIN_STEPS_TO_MEASURE` steps: one thread, no trial, no estimate.
    """
    import torch

    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads must be an integer >= 1, got {threads!r}")
        candidates = [threads]
    elif total_steps < MIN_STEPS_TO_MEASURE:
        return {"threads": 1, "seconds_per_step": {}, "estimate_s": None}
    else:
        candidates = thread_candidates(cores or available_cores())
    saved = [t.detach().clone() for t in state]
    times: dict[int, list[float]] = {c: [] for c in candidates}
    try:
        for c in candidates:
            with thread_limits(c):
                step()  # warm-up: allocations, the thread pool's start
        for _ in range(TRIAL_STEPS):
            for c in candidates:
                with thread_limits(c):
                    t0 = time.perf_counter()
                    step()
                    times[c].append(time.perf_counter() - t0)
    finally:
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)
    per_step = {c: float(np.median(v)) for c, v in times.items()}
    best = min(per_step, key=lambda c: per_step[c] * (MULTI_THREAD_MARGIN if c > 1 else 1.0))
    return {"threads": best, "seconds_per_step": per_step, "estimate_s": per_step[best] * total_steps}


#: Several threads must beat one by this factor in the trial: on a shared machine a second thread
#: that loses its core makes every step wait (measured: 192 s instead of the 16 s estimated).
MULTI_THREAD_MARGIN = 1.25
#: Training on several threads drops to one when an epoch's steps run this much slower than the
#: trial measured on one thread (the machine got busier after the trial).
FALLBACK_SLOWDOWN = 1.5


class _TrainingThreads:
    """The training loop's thread setting: the trial's choice, dropped to one thread for the rest
    of the fit when an epoch shows that several threads now lose to what one thread did in the
    trial. The drop is recorded in ``choice["fallback"]`` and logged."""

    def __init__(self, choice: dict, log: Callable[[str], None] | None):
        self.choice, self.log = choice, log
        self.n = choice["threads"]
        self.one = choice["seconds_per_step"].get(1)
        self.stack = contextlib.ExitStack()

    def __enter__(self):
        self.stack.enter_context(thread_limits(self.n))
        self.t0 = time.perf_counter()
        return self

    def epoch_done(self, epoch: int, steps: int) -> None:
        now = time.perf_counter()
        per_step, self.t0 = (now - self.t0) / max(steps, 1), now
        if self.n > 1 and self.one and per_step > FALLBACK_SLOWDOWN * self.one:
            self.stack.close()
            self.stack.enter_context(thread_limits(1))
            self.choice["fallback"] = {"after_epoch": epoch, "threads": 1, "seconds_per_step_then": per_step}
            if self.log:
                self.log(f"{self.n} threads ran {per_step * 1e3:.1f} ms/step against {self.one * 1e3:.1f} on one "
                         "thread in the trial: one thread from here on")
            self.n = 1
            self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.stack.close()
        return False


def _announce(log: Callable[[str], None] | None, name: str, n: int, dim: int, plan: dict, choice: dict,
              what: str) -> None:
    """The estimate, logged before training."""
    if log is None:
        return
    measured = ", ".join(f"{c} thread{'s' if c > 1 else ''} {s * 1e3:.1f} ms/step"
                         for c, s in sorted(choice["seconds_per_step"].items()))
    eta = (f"about {_duration(choice['estimate_s'])}" if choice["estimate_s"] is not None
           else "too few steps to time")
    log(f"{name}: {plan['steps']:,} optimiser steps ({plan['epochs']} epochs of {plan['steps_per_epoch']}) on "
        f"{n:,} x {dim} ({what}); {choice['threads']} thread{'s' if choice['threads'] > 1 else ''}"
        + (f" (measured: {measured})" if measured else "") + f"; {eta}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------- training


class _Progress:
    """tqdm to stderr (progress=True), nothing (False), or a callable(epoch, epochs, info)."""

    def __init__(self, progress, total: int, desc: str):
        self.fn = progress if callable(progress) else None
        self.bar = None
        self.total = total
        if progress is True:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr, leave=False)

    def update(self, epoch: int, info: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{info['loss']:.4f}")
        if self.fn is not None:
            self.fn(epoch, self.total, info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_inputs(embeddings, k: int, method: str) -> np.ndarray:
    if method not in METHODS:
        raise InputError(f"unknown clustering head {method!r}; choose one of {', '.join(METHODS)}")
    x = np.asarray(embeddings)
    if x.ndim != 2 or len(x) == 0:
        raise InputError(f"embeddings must be a non-empty [N, D] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("embeddings contain NaN or infinite values")
    if not 2 <= k <= len(x):
        raise InputError(f"k must be between 2 and the number of embeddings ({len(x)}), got {k}")
    return x.astype(np.float32)


def _merge_hparams(defaults: dict, given: dict, method: str) -> dict:
    unknown = set(given) - set(defaults)
    if unknown:
        raise InputError(f"unknown {method} hyperparameter(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(defaults)}")
    return {**defaults, **given}


def _predict(head, x, device: str, batch: int = 4096) -> np.ndarray:
    import torch

    head.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(head(torch.as_tensor(x[i:i + batch], device=device)).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _neighbours_for(xn: np.ndarray, n_neighbors: int, neighbors) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_neighbors`` columns of a precomputed graph (distances, indices), or a new one."""
    if neighbors is None:
        return nearest_neighbors(xn, n_neighbors)
    dist, idx = (np.asarray(a) for a in neighbors)
    if dist.shape != idx.shape or dist.ndim != 2 or len(idx) != len(xn):
        raise InputError(f"neighbors must be (distances, indices) of shape [{len(xn)}, K], got "
                         f"{dist.shape} and {idx.shape}")
    if idx.shape[1] < n_neighbors:
        raise InputError(f"neighbors has {idx.shape[1]} columns but n_neighbors={n_neighbors}")
    return dist[:, :n_neighbors].astype(np.float64), idx[:, :n_neighbors].astype(np.int64)


def fit_head(embeddings: np.ndarray, k: int, method: str = "tsp", *, seed: int = 0, device: str = "cpu",
             progress: bool | Callable = True, neighbors: tuple[np.ndarray, np.ndarray] | None = None,
             threads: int | None = None, log: Callable[[str], None] | None = None, **hparams) -> HeadResult:
    """Train a TSP or TEMI clustering head on ``embeddings`` [N, D] for ``k`` clusters.

    ``hparams`` override :data:`TSP_DEFAULTS` / :data:`TEMI_DEFAULTS`. Deterministic for a given
    seed, device and thread count. ``progress``: tqdm to stderr, False, or callable(epoch, epochs, info).
    ``neighbors``: a precomputed graph (distances, indices) from :func:`nearest_neighbors` on
    these embeddings, with at least ``n_neighbors`` columns (it is computed otherwise).
    ``threads``: torch and BLAS threads for training; None: the fastest of 1, half and all the
    cores, timed on a few throwaway steps (:func:`choose_threads`). ``log``: receives the time
    estimate before training (default: stderr when ``progress`` is True). The set-up (K-Means
    starts, neighbour graph) runs on one thread below :data:`SETUP_ONE_THREAD_BELOW` points.
    """
    x = _check_inputs(embeddings, k, method)
    import torch

    fit = _fit_tsp if method == "tsp" else _fit_temi
    defaults = TSP_DEFAULTS if method == "tsp" else TEMI_DEFAULTS
    hp = _merge_hparams(defaults, hparams, method)
    if method == "temi" and not 0.5 < hp["beta"] <= 1.0:
        raise InputError(f"TEMI beta must be in (0.5, 1], got {hp['beta']}")
    plan = schedule(len(x), hp["batch_size"], hp["epochs"], hp["min_epochs"], hp["min_steps"])
    xn = l2_normalize(x).astype(np.float32)
    if not 1 <= hp["n_neighbors"] < len(x):
        raise InputError(f"need 1 <= n_neighbors < number of embeddings, got {hp['n_neighbors']} "
                         f"with {len(x)} embeddings")
    if log is None and progress is True:
        log = _stderr
    t0 = time.perf_counter()
    state = torch.random.get_rng_state()
    try:
        with thread_limits(1 if len(x) < SETUP_ONE_THREAD_BELOW else available_cores()):
            graph = _neighbours_for(xn, hp["n_neighbors"], neighbors)
            torch.manual_seed(seed)
            kw = {key: v for key, v in hp.items() if key not in ("epochs", "min_epochs", "min_steps", "n_neighbors")}
            head, history, choice = fit(xn, k, graph, plan, seed=seed, device=device, progress=progress,
                                        threads=threads, log=log, **kw)
    finally:
        torch.random.set_rng_state(state)
    head = head.cpu().eval()
    probs = _predict(head, x, "cpu")
    choice = {**choice, "seconds": round(time.perf_counter() - t0, 3)}
    return HeadResult(labels_=probs.argmax(axis=1).astype(np.int64), probs_=probs, head=head,
                      history=history, method=method, hparams=hp, schedule=plan, threads=choice)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _batches(n: int, batch_size: int, gen) -> list:
    import torch

    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def _tsp_init(xn: np.ndarray, k: int, n_heads: int, init: str, seed: int, kmeans_n_init: int,
              cosine: bool) -> np.ndarray:
    """Initial weights [H, k, D]: App. A's phi_c = C_c / (||C_c|| sqrt(D)) from one K-Means run per
    head (seeds seed * 1000 + h), or random (PyTorch's linear initialisation, or unit normal for
    the cosine layer, whose scale does not matter)."""
    import torch

    n_dim = xn.shape[1]
    if init == "kmeans":
        from sklearn.cluster import KMeans

        out = np.empty((n_heads, k, n_dim), np.float32)
        for h in range(n_heads):
            centres = KMeans(k, n_init=kmeans_n_init, random_state=seed * 1000 + h).fit(xn).cluster_centers_
            out[h] = centres / (np.linalg.norm(centres, axis=1, keepdims=True) * math.sqrt(n_dim))
        return out
    if init != "random":
        raise InputError(f"TSP init must be 'kmeans' or 'random', got {init!r}")
    if cosine:
        return torch.randn(n_heads, k, n_dim).numpy()
    bound = 1.0 / math.sqrt(n_dim)
    return torch.empty(n_heads, k, n_dim).uniform_(-bound, bound).numpy()


def _fit_tsp(xn: np.ndarray, k: int, graph, plan: dict, *, seed, device, progress, threads, log, sigma_rank,
             entropy_weight, lr, batch_size, init, kmeans_n_init, n_heads, temperature):
    import torch
    from torch.nn import functional as F

    if not isinstance(n_heads, int) or n_heads < 1:
        raise InputError(f"TSP n_heads must be an integer >= 1, got {n_heads!r}")
    if temperature is not None and not temperature > 0:
        raise InputError(f"TSP temperature must be > 0 (or None for the linear layer), got {temperature!r}")
    cosine = temperature is not None
    dist, idx = graph
    n_neighbors = idx.shape[1]
    n, dim = xn.shape
    weights = tsp_neighbor_weights(dist, sigma_rank)

    # All heads are one [H k, D] matrix, so that a step is one GEMM over the distinct rows of the
    # batch and its neighbours whatever H is (and H k columns use the GEMM far better than k).
    W = torch.nn.Parameter(torch.as_tensor(_tsp_init(xn, k, n_heads, init, seed, kmeans_n_init, cosine))
                           .reshape(n_heads * k, dim).to(device))
    b = torch.nn.Parameter(torch.zeros(n_heads * k, device=device))
    params = [W] if cosine else [W, b]
    scale = 1.0 if cosine else math.sqrt(dim)  # see LinearClusterHead

    def all_logits(z):  # rows [R, D] of unit vectors (times scale) -> [R, H, k]
        if cosine:
            return (z @ F.normalize(W.view(n_heads, k, dim), dim=-1).view(n_heads * k, dim).T
                    / temperature).view(-1, n_heads, k)
        return torch.addmm(b, z, W.T).view(-1, n_heads, k)

    # The rows are unit vectors already: train on them (times sqrt(D) for the linear layer) directly,
    # so that a step does no normalisation, and gather with index_select (several times faster
    # than fancy indexing on CPU).
    Z = torch.as_tensor(xn * np.float32(scale), device=device)
    I = torch.as_tensor(idx, device=device)
    Wn = torch.as_tensor(weights, dtype=torch.float32, device=device)
    def step(bt, opt):
        # Each distinct row once: anchors and neighbours overlap, more so on small collections.
        rows, inv = torch.unique(torch.cat([bt, I.index_select(0, bt).reshape(-1)]), return_inverse=True)
        p = torch.softmax(all_logits(Z.index_select(0, rows)), dim=-1).index_select(0, inv)
        pa, pn = p[:len(bt)], p[len(bt):].view(len(bt), n_neighbors, n_heads, k)
        loss, c, e = tsp_head_losses(pa, pn, Wn.index_select(0, bt), entropy_weight)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # heads share no weights: each gets the gradient of its own loss
        opt.step()
        return loss, c, e

    trial_batch = _batches(n, batch_size, torch.Generator().manual_seed(seed + 1))[0].to(device)
    trial_opt = torch.optim.Adam(params, lr=lr)
    choice = choose_threads(lambda: step(trial_batch, trial_opt), params, plan["steps"], threads)
    del trial_opt
    _announce(log, "TSP", n, dim, plan, choice, f"{n_heads} head{'s' if n_heads > 1 else ''} of k = {k}")
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    epochs = plan["epochs"]
    bar = _Progress(progress, epochs, "TSP heads" if n_heads > 1 else "TSP head")
    with _TrainingThreads(choice, log) as pool:
        for epoch in range(epochs):
            tot = cons = ent = 0.0
            batches = _batches(n, batch_size, gen)
            for bt in batches:
                loss, c, e = step(bt.to(device), opt)
                tot, cons, ent = tot + loss.mean().item(), cons + c.mean().item(), ent + e.mean().item()
            info = {"epoch": epoch + 1, "loss": tot / len(batches), "consistency": cons / len(batches),
                    "entropy": ent / len(batches)}
            history.append(info)
            bar.update(epoch + 1, info)
            pool.epoch_done(epoch + 1, len(batches))
        bar.close()
        with torch.no_grad():
            full = _tsp_full_losses(all_logits, Z, I, Wn, n_heads, k, entropy_weight)
    best = int(torch.argmin(full))
    if history:
        history[-1].update(head_losses=full.tolist(), best_head=best)
    mods = _modules()
    sl = slice(best * k, (best + 1) * k)
    if cosine:
        head = mods["CosineClusterHead"](dim, k, temperature)
        with torch.no_grad():
            head.weight.copy_(W[sl])
    else:
        head = mods["LinearClusterHead"](dim, k)
        with torch.no_grad():
            head.linear.weight.copy_(W[sl])
            head.linear.bias.copy_(b[sl])
    return head, history, choice


def _tsp_full_losses(all_logits, Z, I, Wn, n_heads: int, k: int, entropy_weight: float, chunk: int = 2048):
    """Eq. (5) of each head over all the data (every point an anchor, the marginal of all points): [H].
    This, not the last batches' noisy mean, picks the head that is kept."""
    import torch

    P = torch.cat([torch.softmax(all_logits(Z[i:i + chunk]), dim=-1) for i in range(0, len(Z), chunk)])
    consistency = torch.zeros(n_heads, dtype=torch.float64)
    for i in range(0, len(Z), chunk):  # the batch loss's consistency term, chunk by chunk, weighted by its size
        pa, pn = P[i:i + chunk], P.index_select(0, I[i:i + chunk].reshape(-1)).view(-1, I.shape[1], n_heads, k)
        consistency += tsp_head_losses(pa, pn, Wn[i:i + chunk], 0.0)[1].double() * len(pa)
    return consistency / len(Z) - entropy_weight * _entropy(P.mean(dim=0).double())


def _adamw(params, lr, weight_decay):
    import torch

    try:  # one pass over the weights instead of several (memory-bound at 50 heads x 512)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _fit_temi(xn: np.ndarray, k: int, graph, plan: dict, *, seed, device, progress, threads, log, n_heads, beta,
              hidden_dim, batch_size, lr, weight_decay, student_temp, teacher_temp, teacher_momentum, probs_momentum):
    import copy

    import torch

    _, idx = graph
    n_neighbors = idx.shape[1]

    mods = _modules()
    student = mods["MultiMLPHead"](xn.shape[1], k, n_heads, hidden_dim).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    s_params, t_params = list(student.parameters()), list(teacher.parameters())
    marginal = torch.full((n_heads, 1, k), 1.0 / k, device=device)

    X = torch.as_tensor(xn, device=device)
    I = torch.as_tensor(idx, device=device)
    total_steps = max(1, plan["steps"])
    step_no = [0]

    def step(b, gen, opt):
        pick = torch.randint(0, n_neighbors, (len(b),), generator=gen)
        b = b.to(device)
        b2 = I[b, pick.to(device)]
        xb = X.index_select(0, torch.cat([b, b2]))
        s = torch.softmax(student(xb) / student_temp, dim=-1)
        with torch.no_grad():
            t = torch.softmax(teacher(xb) / teacher_temp, dim=-1)
        s1, s2 = s[:, :len(b)], s[:, len(b):]
        t1, t2 = t[:, :len(b)], t[:, len(b):]
        loss, per_head = temi_loss(s1, s2, t1, t2, marginal, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            m = 1 - (1 - teacher_momentum) * (math.cos(math.pi * step_no[0] / total_steps) + 1) / 2
            torch._foreach_lerp_(t_params, s_params, 1 - m)
            marginal.mul_(probs_momentum).add_(t.mean(dim=1, keepdim=True), alpha=1 - probs_momentum)
        return loss, per_head

    trial_gen = torch.Generator().manual_seed(seed + 1)
    trial_batch = _batches(len(xn), batch_size, trial_gen)[0]
    trial_opt = _adamw(s_params, lr, weight_decay)
    choice = choose_threads(lambda: step(trial_batch, trial_gen, trial_opt), s_params + t_params + [marginal],
                            plan["steps"], threads)
    del trial_opt
    _announce(log, "TEMI", len(xn), xn.shape[1], plan, choice, f"{n_heads} heads of {hidden_dim}, k = {k}")
    opt = _adamw(s_params, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n_batches = plan["steps_per_epoch"]
    history = []
    bar = _Progress(progress, plan["epochs"], "TEMI heads")
    with _TrainingThreads(choice, log) as pool:
        for epoch in range(plan["epochs"]):
            student.train()
            tot = 0.0
            head_loss = torch.zeros(n_heads)
            for b in _batches(len(xn), batch_size, gen):
                loss, per_head = step(b, gen, opt)
                step_no[0] += 1
                tot += loss.item()
                head_loss += per_head.detach().cpu()
            info = {"epoch": epoch + 1, "loss": tot / n_batches,
                    "head_losses": (head_loss / n_batches).tolist()}
            history.append(info)
            bar.update(epoch + 1, info)
            pool.epoch_done(epoch + 1, n_batches)
    bar.close()
    # As the official code: keep the teacher head with the lowest loss over the last epoch.
    best = int(np.argmin(history[-1]["head_losses"])) if history else 0
    if history:
        history[-1]["best_head"] = best
    return mods["MLPClusterHead"].from_multi(teacher, best, teacher_temp), history, choice


# ----------------------------------------------------------------------------- estimator


class ClusteringHead:
    """scikit-learn-style wrapper of :func:`fit_head`: ``fit(X)`` returns self, sets ``labels_``."""

    def __init__(self, method: str = "tsp", k: int = 10, random_state: int = 0, device: str = "cpu",
                 progress: bool | Callable = False, **hparams):
        self.method = method
        self.k = k
        self.random_state = random_state
        self.device = device
        self.progress = progress
        self.hparams = hparams

    def fit(self, X, y=None) -> "ClusteringHead":
        r = fit_head(X, self.k, self.method, seed=self.random_state, device=self.device,
                     progress=self.progress, **self.hparams)
        self.labels_, self.probs_, self.head_, self.history_ = r.labels_, r.probs_, r.head, r.history
        return self

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).labels_

    def predict_proba(self, X) -> np.ndarray:
        if not hasattr(self, "head_"):
            raise InputError("ClusteringHead is not fitted; call fit(X) first")
        return _predict(self.head_, np.asarray(X, dtype=np.float32), "cpu")

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)
