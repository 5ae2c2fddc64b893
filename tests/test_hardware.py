"""itae_export.hardware: /proc/cpuinfo samples of the CPU kinds the benchmarks name."""

from itae_export.hardware import cpu_kind, describe, mlas_kernels, parse_cpuinfo

ZEN3 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC
cpu MHz		: 2445.406
physical id	: 0
siblings	: 2
core id		: 0
cpu cores	: 2
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2

processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC
cpu MHz		: 2445.406
physical id	: 0
siblings	: 2
core id		: 1
cpu cores	: 2
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""


def _intel(flags: str, n: int = 4) -> str:
    """n logical CPUs, two hyperthreads per core."""
    return "\n\n".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
                       f"model name\t: Intel(R) Xeon(R) Platinum 8480+\ncpu MHz\t\t: 2000.000\nphysical id\t: 0\n"
                       f"core id\t\t: {i // 2}\nflags\t\t: {flags}" for i in range(n)) + "\n"


def test_parses_this_zen3_sample():
    cpu = parse_cpuinfo(ZEN3)
    assert (cpu.model, cpu.vendor, cpu.family, cpu.model_number) == ("AMD EPYC", "AuthenticAMD", 25, 1)
    assert cpu.logical_cpus == 2 and cpu.physical_cores == 2 and cpu.mhz == 2445.406
    assert cpu.simd["avx2"] and cpu.simd["fma"] and not cpu.simd["avx512f"] and not cpu.vnni
    assert cpu_kind(cpu) == "avx2"
    peak, how = cpu.fp32_peak_gflops()
    assert abs(peak - 2 * 2.445406 * 2 * 8 * 2) < 1e-6 and "2 FMA" in how  # 156.5 GFLOP/s
    assert "AVX2" in mlas_kernels(cpu)["int8_gemm"] and "saturation" in mlas_kernels(cpu)["int8_gemm"]
    assert any("kind avx2" in line for line in describe(2, cpu))


def test_vnni_and_amx_kinds_and_hyperthreads():
    spr = parse_cpuinfo(_intel("avx2 fma avx512f avx512bw avx512vl avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16"))
    assert spr.physical_cores == 2 and spr.logical_cpus == 4
    assert cpu_kind(spr) == "amx" and spr.vnni and spr.fp32_lanes == 16
    assert "AMX" in mlas_kernels(spr)["int8_gemm"]
    clx = parse_cpuinfo(_intel("avx2 fma avx512f avx512bw avx512_vnni"))
    assert cpu_kind(clx) == "avx512-vnni" and "VNNI" in mlas_kernels(clx)["int8_gemm"]
    adl = parse_cpuinfo(_intel("avx2 fma avx_vnni"))
    assert cpu_kind(adl) == "avx-vnni" and adl.fp32_lanes == 8
    assert cpu_kind(parse_cpuinfo(_intel("avx2 fma avx512f avx512bw"))) == "avx512"


def test_unknown_text_is_unknown_not_guessed():
    cpu = parse_cpuinfo("")
    assert cpu.model == "unknown" and cpu.mhz is None and cpu_kind(cpu) == "other"
    assert cpu.fp32_peak_gflops() == (None, "clock unknown")
