"""GPU figures, where a GPU is at hand: ORT CUDA (and TensorRT) fp16 against PyTorch fp16 SDPA.

For each model and batch size, in interleaved turns (medians):

- ``ORT CUDA fp16``: the ``--precision fp16`` export on the CUDA execution provider, input and
  output bound on the device (IOBinding, as ``itae-cluster`` runs on CUDA);
- ``ORT TensorRT fp16``: the same graph on the TensorRT execution provider, if this wheel has it
  and it starts (engine build time reported, not timed);
- ``PyTorch fp16 SDPA``: the same model in PyTorch on CUDA, half precision,
  ``scaled_dot_product_attention`` (only where torch has CUDA: the CPU torch pinned here has not);
- the **tensor-core ceiling**: the best fp16 GEMM rate reached here (n x n, ORT's CUDA MatMul and
  torch where it has CUDA), so that each graph reads as a share of it.

Then ``itae-cluster`` end to end on CUDA against CPU on the textile images (``--cluster``).

    .venv/bin/python bench/bench_gpu.py                                  # ViT-B/14 and ViT-L/14, batches 64 256
    .venv/bin/python bench/bench_gpu.py --models dinov2_vitb14 --batches 64 --repeats 3 --cluster

Without a CUDA device it says so and exits 2 (nothing is measured on the CPU in its place).
Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import build  # noqa: E402
from common import format_table, interleaved, matmul_graph, median, print_machine, spread, vit_flops  # noqa: E402


def cuda_session(path: Path, provider: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(path.parent / "trt")} if provider == "TensorrtExecutionProvider" else {}
    providers = [(provider, opts)] + ([("CUDAExecutionProvider", {})] if provider != "CUDAExecutionProvider" else [])
    sess = ort.InferenceSession(str(path), so, providers=providers)
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"{provider} did not start (session runs on {sess.get_providers()})")
    return sess


def bound_call(sess, x: np.ndarray, out_name: str = "embedding"):
    """A call running ``sess`` on ``x`` kept on the GPU (IOBinding; output left on the device)."""
    import onnxruntime as ort

    xd = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    io = sess.io_binding()
    io.bind_ortvalue_input(sess.get_inputs()[0].name, xd)
    io.bind_output(out_name, "cuda", 0)

    def run():
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
    return run


def fp16_ceiling(workdir: Path, n: int, torch_cuda: bool) -> dict[str, tuple]:
    """{library: (call, flops)} of n x n fp16 GEMMs on the GPU."""
    import onnx

    calls = {}
    path = workdir / "mm16.onnx"
    matmul_graph("m", n, n, path, np.random.default_rng(0))
    m = onnx.load(str(path))
    for t in m.graph.initializer:  # float32 weights -> float16, input and output too
        arr = onnx.numpy_helper.to_array(t).astype(np.float16)
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(m, str(path))
    sess = cuda_session(path, "CUDAExecutionProvider")
    calls["ort_cuda"] = (bound_call(sess, np.random.default_rng(1).standard_normal((n, n)).astype(np.float16), "y"),
                         2.0 * n**3)
    if torch_cuda:
        import torch

        a = torch.randn(n, n, device="cuda", dtype=torch.float16)
        b = torch.randn(n, n, device="cuda", dtype=torch.float16)

        def tmm():
            torch.mm(a, b)
            torch.cuda.synchronize()
        calls["torch"] = (tmm, 2.0 * n**3)
    return calls


def bench_model(name: str, args, workdir: Path, log) -> list[dict]:
    import onnxruntime as ort

    from itae_export.onnx.export import export_onnx

    spec, options, model, _ = build(name, None)
    path = workdir / f"{name}_fp16.onnx"
    log(f"exporting {name} fp16 ...")
    export_onnx(spec, options, path, model=copy.deepcopy(model), precision="fp16", validate=args.validate)
    flops = vit_flops(spec.arch, spec.preprocessing.resolution, cls_only_last=True).total
    sessions = {"ORT CUDA fp16": cuda_session(path, "CUDAExecutionProvider")}
    if "TensorrtExecutionProvider" in ort.get_available_providers() and not args.no_trt:
        try:
            t0 = time.perf_counter()
            sessions["ORT TensorRT fp16"] = cuda_session(path, "TensorrtExecutionProvider")
            log(f"  TensorRT session in {time.perf_counter() - t0:.0f} s")
        except Exception as e:  # noqa: BLE001  (a missing TensorRT library is a finding, not a crash)
            log(f"  TensorRT EP did not start: {e}")
    torch_model = None
    if args.torch_cuda:
        import torch

        torch_model = model.half().cuda().eval()
    rows = []
    res = spec.preprocessing.resolution
    for bs in args.batches:
        x = np.random.default_rng(0).standard_normal((bs, 3, res, res)).astype(np.float16)
        fns = {k: bound_call(s, x) for k, s in sessions.items()}
        if torch_model is not None:
            import torch

            xt = torch.from_numpy(x).cuda()

            def tr(xt=xt):
                with torch.no_grad(), torch.nn.attention.sdpa_kernel(
                        [torch.nn.attention.SDPBackend.FLASH_ATTENTION, torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
                         torch.nn.attention.SDPBackend.MATH]):
                    torch_model(xt)
                torch.cuda.synchronize()
            fns["PyTorch fp16 SDPA"] = tr
        fns.update({f"GEMM {k}": c for k, (c, _) in args.ceiling_calls.items()})
        log(f"{name} batch {bs}: {args.repeats} turns ...")
        t = interleaved(fns, repeats=args.repeats, warmup=2)
        rates = {k: f / median(t[f"GEMM {k}"]) / 1e9 for k, (_, f) in args.ceiling_calls.items()}
        ceiling = max(rates.values())
        for k in fns:
            if k.startswith("GEMM "):
                continue
            per = median(t[k]) / bs
            rows.append({"model": name, "batch": bs, "variant": k, "images_s": 1 / per,
                         "gflop_s": flops / per / 1e9, "of_ceiling": flops / per / 1e9 / ceiling, "spread": spread(t[k])})
        for k, r in rates.items():
            rows.append({"model": name, "batch": bs, "variant": f"fp16 GEMM n={args.n} {k}", "gflop_s": r,
                         "of_ceiling": r / ceiling})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dinov2_vitb14,dinov2_vitl14")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=8192, help="fp16 GEMM size for the tensor-core ceiling")
    ap.add_argument("--no-trt", action="store_true")
    ap.add_argument("--validate", action="store_true", help="validate the fp16 exports (ORT CPU: slow)")
    ap.add_argument("--cluster", action="store_true", help="also itae-cluster on CUDA against CPU (bench_cluster)")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    print_machine(None)
    import onnxruntime as ort

    def log(m):
        print(m, file=sys.stderr, flush=True)

    try:
        import torch

        args.torch_cuda = torch.cuda.is_available()
    except ImportError:
        args.torch_cuda = False
    work = Path(tempfile.mkdtemp(prefix="itae-gpu-"))
    try:
        args.ceiling_calls = fp16_ceiling(work, args.n, args.torch_cuda)
    except Exception as e:  # noqa: BLE001
        print(f"no CUDA device for ONNX Runtime here ({e}); providers {ort.get_available_providers()}: "
              "nothing measured", file=sys.stderr)
        sys.exit(2)
    devs = [f"{d.device.vendor} {dict(d.device.metadata)}" for d in ort.get_ep_devices() if d.ep_name == "CUDAExecutionProvider"]
    print(f"GPU: {devs or 'CUDA EP (device not described by ORT)'}; torch CUDA: {args.torch_cuda}")
    if args.torch_cuda:
        import torch

        print(f"torch device: {torch.cuda.get_device_name(0)}")
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args, work, log)
    print(format_table(rows, [("model", "model"), ("batch", "batch"), ("variant", "variant"), ("images_s", "images/s"),
                              ("gflop_s", "GFLOP/s"), ("of_ceiling", "of fp16 GEMM ceiling"), ("spread", "noise")]))
    if args.cluster:
        import subprocess

        for dev in ("cuda", "cpu"):
            print(f"\nitae-cluster on {dev}: see bench_cluster.py output below")
            subprocess.run([sys.executable, str(Path(__file__).parent / "bench_cluster.py"), "--n", "640",
                            "--device", dev], check=False)


if __name__ == "__main__":
    main()
