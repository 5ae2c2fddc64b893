"""Can ONNX Runtime really run on CUDA here? Asked without alarming CPU-only users."""

from __future__ import annotations

import functools
import shutil


@functools.lru_cache(maxsize=1)
def cuda_usable() -> tuple[bool, str]:
    """(usable, reason). onnxruntime-gpu lists CUDAExecutionProvider even without a GPU or the
    CUDA libraries, so the provider list alone proves nothing: look for a driver first, then
    open a tiny session and check which provider it really got."""
    import os

    if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
        return False, "no NVIDIA driver or device on this machine"
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover
        return False, f"onnxruntime is not importable ({e})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this ONNX Runtime build has no CUDAExecutionProvider"
    try:
        import onnx
        from onnx import TensorProto, helper

        g = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        m.ir_version = 8
        so = ort.SessionOptions()
        so.log_severity_level = 4  # the CUDA EP's load failure is expected here, not an error to show
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if "CUDAExecutionProvider" not in sess.get_providers():
            return False, "the CUDA provider did not load (CUDA/cuDNN libraries missing?)"
        return True, "ok"
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        return False, f"a CUDA session could not be created ({type(e).__name__})"
