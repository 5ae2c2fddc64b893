"""Helpers shared by the benchmarks: interleaved timing, the sgemm ceiling, ViT FLOP counts.

On a shared machine the load changes while a benchmark runs. Every comparison is therefore
timed side by side: the variants run in turns (A B C A B C ...) and each reports the median of
its turns, so a load change hits all of them alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable


def interleaved(variants: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, run in turns ``repeats`` times after ``warmup`` turns."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """Relative half-range of the middle half of the samples (a noise indicator)."""
    if len(xs) < 4:
        return (max(xs) - min(xs)) / (2 * median(xs))
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / (2 * median(xs))


def sgemm_call(n: int = 2048) -> tuple[Callable[[], object], float]:
    """(a call doing one n x n float32 matmul in PyTorch (MKL), its FLOPs)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


@dataclass
class FlopCount:
    """Multiply-adds x 2 of one image through a ViT, by part (see :func:`vit_flops`)."""

    patch_embed: float
    qkv: float
    attention: float  # QK^T and AV
    proj: float
    mlp: float
    head: float

    @property
    def total(self) -> float:
        return self.patch_embed + self.qkv + self.attention + self.proj + self.mlp + self.head


def vit_flops(arch, resolution: int = 224, cls_only_last: bool = False) -> FlopCount:
    """FLOPs (2 x multiply-adds) of the matrix products of one image; norms, softmax, GELU left out.

    With T = 1 + R + N tokens, width D, MLP hidden width F, per block:
    qkv 3 D^2 T, attention 2 T^2 D (QK^T and AV), proj D^2 T, MLP 2 D F T (3 D F T for SwiGLU).
    ``cls_only_last``: the last block computes qkv for all T tokens but the attention row, proj
    and MLP for the CLS token only (what the exported graph does when only the embedding is used).
    """
    D, F, L = arch.embed_dim, arch.mlp_hidden, arch.depth
    p = arch.patch_size
    N = (resolution // p) ** 2
    T = 1 + arch.num_register_tokens + N
    mlp_per_token = (3 if arch.ffn == "swiglu" else 2) * D * F
    full = dict(qkv=3 * D * D * T, attention=2 * T * T * D, proj=D * D * T, mlp=mlp_per_token * T)
    last = dict(full) if not cls_only_last else dict(qkv=3 * D * D * T, attention=2 * T * D, proj=D * D, mlp=mlp_per_token)
    macs = {k: (L - 1) * full[k] + last[k] for k in full}
    head = D * arch.proj_dim if arch.proj_dim else 0
    return FlopCount(patch_embed=2.0 * N * 3 * p * p * D, head=2.0 * head, **{k: 2.0 * v for k, v in macs.items()})


def machine_info() -> dict:
    """What a benchmark table must say about where it ran."""
    import numpy as np

    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for mod in ("torch", "onnxruntime", "onnx"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def physical_cores() -> int:
    """Physical cores (ONNX Runtime's default intra-op thread count); logical CPUs if unknown."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    cores.add((phys, core))
                    phys = core = None
        return len(cores) or os.cpu_count() or 1
    except OSError:
        return os.cpu_count() or 1


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` is [(key, header)]."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
