"""Which CPU a figure was measured on: model, the SIMD flags that decide the GEMM kernels, cores.

Benchmarks print :func:`describe`; ``--optimize`` records :func:`cpu_kind` in the manifest, since
which rewrite wins depends on it (``docs/performance.md`` keeps one table per kind).

Everything here reads ``/proc/cpuinfo`` (Linux); elsewhere the fields are unknown, not guessed.
ONNX Runtime does not report which MLAS kernels it dispatched to; :func:`mlas_kernels` names the
family that MLAS's cpuid dispatch picks for these flags, and says that it is inferred.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

#: The flags that change which GEMM kernels run (Linux /proc/cpuinfo spelling).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str = "unknown"
    family: int | None = None
    model_number: int | None = None
    flags: frozenset[str] = field(default_factory=frozenset)
    logical_cpus: int = 1
    physical_cores: int = 1
    mhz: float | None = None  # "cpu MHz" of the first CPU: the current clock (often the nominal one in a VM)

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def vnni(self) -> bool:
        return self.has("avx512_vnni") or self.has("avx_vnni")

    @property
    def simd(self) -> dict[str, bool]:
        return {f: self.has(f) for f in SIMD_FLAGS}

    @property
    def fp32_lanes(self) -> int:
        return 16 if self.has("avx512f") else 8 if self.has("avx2") or self.has("avx") else 4

    def fma_pipes(self) -> tuple[int, str]:
        """(vector FMA pipes per core at ``fp32_lanes`` width, why). An assumption from the family,
        since cpuinfo does not say it."""
        if self.vendor == "AuthenticAMD" and self.family == 23 and (self.model_number or 0) < 0x30:
            return 1, "Zen 1: two 128-bit FMA units, one 256-bit FMA per cycle"
        if self.vendor == "AuthenticAMD" and self.family == 25 and self.has("avx512f"):
            return 1, "Zen 4: 512-bit FMA in two 256-bit halves, one per cycle"
        if self.vendor == "AuthenticAMD" and self.family in (23, 25, 26):
            return 2, "Zen 2 and later: two 256-bit FMA pipes" if not self.has("avx512f") else "Zen 5: two FMA pipes"
        if self.has("avx512f"):
            return 2, "AVX-512 Xeon: two 512-bit FMA pipes assumed (some Silver/Bronze parts have one)"
        return 2, "two FMA pipes assumed (Haswell and later)"

    def fp32_peak_gflops(self, cores: int | None = None) -> tuple[float | None, str]:
        """(theoretical fp32 GFLOP/s on ``cores`` cores: clock x pipes x lanes x 2, how)."""
        cores = cores or self.physical_cores
        if not self.mhz:
            return None, "clock unknown"
        pipes, why = self.fma_pipes()
        peak = cores * self.mhz / 1e3 * pipes * self.fp32_lanes * 2
        return peak, (f"{cores} cores x {self.mhz / 1e3:.2f} GHz x {pipes} FMA x {self.fp32_lanes} fp32 lanes x 2 "
                      f"({why}; clock from cpuinfo, no turbo)")


def parse_cpuinfo(text: str, logical_cpus: int | None = None) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (x86 layout: blocks per logical CPU)."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    first: dict[str, str] = {}
    cores: set[tuple[str, str]] = set()
    for i, block in enumerate(blocks):
        fields = {}
        for line in block.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                fields[k.strip()] = v.strip()
        if i == 0:
            first = fields
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    n_logical = logical_cpus or len(blocks) or 1

    def num(key, base=10):
        try:
            return int(first[key], base)
        except (KeyError, ValueError):
            return None

    try:
        mhz = float(first["cpu MHz"])
    except (KeyError, ValueError):
        mhz = None
    return CpuInfo(
        model=first.get("model name") or first.get("Processor") or "unknown",
        vendor=first.get("vendor_id", "unknown"),
        family=num("cpu family"), model_number=num("model"),
        flags=frozenset((first.get("flags") or first.get("Features") or "").split()),
        logical_cpus=n_logical, physical_cores=len(cores) or n_logical, mhz=mhz)


def read_cpu() -> CpuInfo:
    """This machine's :class:`CpuInfo` (from /proc/cpuinfo; the model from ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read(), os.cpu_count())
    except OSError:
        n = os.cpu_count() or 1
        return CpuInfo(model=platform.processor() or "unknown", logical_cpus=n, physical_cores=n)


def cpu_kind(cpu: CpuInfo | None = None) -> str:
    """The kind of CPU as far as the GEMM kernels go: ``amx``, ``avx512-vnni``, ``avx-vnni``,
    ``avx512``, ``avx2`` or ``other``. Speed figures and ``--optimize`` choices are per kind."""
    cpu = cpu or read_cpu()
    if cpu.has("amx_int8"):
        return "amx"
    if cpu.has("avx512_vnni"):
        return "avx512-vnni"
    if cpu.has("avx_vnni"):
        return "avx-vnni"
    if cpu.has("avx512f"):
        return "avx512"
    if cpu.has("avx2") and cpu.has("fma"):
        return "avx2"
    return "other"


def mlas_kernels(cpu: CpuInfo | None = None) -> dict[str, str]:
    """The MLAS kernel families ONNX Runtime's CPU provider picks for these flags (inferred from
    MLAS's cpuid dispatch: ORT does not report them)."""
    cpu = cpu or read_cpu()
    if cpu.has("avx512f"):
        sgemm = "AVX-512F (MlasGemmFloatKernelAvx512F)"
    elif cpu.has("avx2") and cpu.has("fma"):
        sgemm = "AVX2+FMA3 (MlasGemmFloatKernelFma3)"
    else:
        sgemm = "SSE/AVX"
    if cpu.has("amx_int8"):
        qgemm = "AMX (MlasGemmU8S8DispatchAmx)"
    elif cpu.has("avx512_vnni"):
        qgemm = "AVX-512 VNNI (vpdpbusd)"
    elif cpu.has("avx_vnni"):
        qgemm = "AVX-VNNI (vpdpbusd, 256-bit)"
    elif cpu.has("avx512bw"):
        qgemm = "AVX-512BW (vpmaddubsw + vpmaddwd, int16 saturation)"
    elif cpu.has("avx2"):
        qgemm = "AVX2 (vpmaddubsw + vpmaddwd, int16 saturation)"
    else:
        qgemm = "SSE4.1"
    return {"sgemm": sgemm, "int8_gemm": qgemm, "source": "inferred from the CPU flags; ORT does not report them"}


def ort_info() -> dict:
    """ONNX Runtime's version, providers and its own view of the CPU device, where it gives one."""
    import onnxruntime as ort

    info = {"version": ort.__version__, "providers": ort.get_available_providers()}
    try:
        devs = [d for d in ort.get_ep_devices() if d.ep_name == "CPUExecutionProvider"]
        if devs:
            info["cpu_device_vendor"] = devs[0].device.vendor
    except AttributeError:  # older ORT
        pass
    return info


def describe(threads: int | None = None, cpu: CpuInfo | None = None) -> list[str]:
    """Lines for a benchmark header: CPU, flags, kind, kernels, threads, ONNX Runtime."""
    cpu = cpu or read_cpu()
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu.simd.items()
                      if f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"))
    k = mlas_kernels(cpu)
    peak, how = cpu.fp32_peak_gflops(threads)
    lines = [f"cpu: {cpu.model} ({cpu.vendor} family {cpu.family} model {cpu.model_number}), "
             f"{cpu.physical_cores} cores / {cpu.logical_cpus} logical, {cpu.mhz or '?'} MHz; kind {cpu_kind(cpu)}",
             f"flags: {flags}",
             f"MLAS kernels, {k['source']}: sgemm {k['sgemm']}; int8 {k['int8_gemm']}",
             f"threads: {threads if threads else 'library default'}; fp32 peak "
             + (f"{peak:.0f} GFLOP/s = {how}" if peak else f"unknown ({how})")]
    try:
        o = ort_info()
        lines.append(f"onnxruntime {o['version']}, providers {', '.join(o['providers'])}"
                     + (f", CPU device vendor {o['cpu_device_vendor']}" if "cpu_device_vendor" in o else ""))
    except ImportError:
        pass
    return lines
