"""The one way to run an exported model: device choice (is CUDA really usable?), ONNX Runtime
sessions with a quiet CPU fallback, IOBinding on CUDA."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itae_export.errors import InputError, OptionError
from itae_export.onnx.contract import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_MASK
from itae_export.onnx.manifest import output_problem, read_manifest, weight_file_problem

DEVICES = ("auto", "cuda", "cpu")
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


@functools.lru_cache(maxsize=1)
def cuda_usable() -> tuple[bool, str]:
    """(usable, reason). onnxruntime-gpu lists CUDAExecutionProvider even without a GPU or the
    CUDA libraries, so the provider list alone proves nothing: look for a driver first, then
    open a tiny session and check which provider it really got."""
    if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
        return False, "no NVIDIA driver or device on this machine"
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover
        return False, f"onnxruntime is not importable ({e})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this ONNX Runtime build has no CUDAExecutionProvider"
    try:
        from onnx import TensorProto, helper

        g = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        m.ir_version = 8
        # the CUDA EP's load failure is expected here, not an error to show
        sess = ort_session(m, [CUDA_EP, CPU_EP], log_severity=4)
        if "CUDAExecutionProvider" not in sess.get_providers():
            return False, "the CUDA provider did not load (CUDA/cuDNN libraries missing?)"
        return True, "ok"
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        return False, f"a CUDA session could not be created ({type(e).__name__})"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cap_threads(requested: int | None, log: Callable[[str], None] | None = None) -> int | None:
    """``--threads``: at most the cores this process may use (ONNX Runtime starts every intra-op thread
    it is asked for, and 100000 of them took gigabytes and never finished); ``log`` says when it caps."""
    if not requested:
        return requested
    cores = available_cores()
    if int(requested) > cores:
        if log:
            log(f"--threads {requested}: this process may use {cores} cores; using {cores}")
        return cores
    return int(requested)


def resolve_device(device: str) -> tuple[str, str]:
    """(provider, why) for ``auto``, ``cuda`` or ``cpu``. ``cuda`` where CUDA is unusable is an InputError."""
    if device not in DEVICES:
        raise OptionError(f"--device: {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu":
        return CPU_EP, "asked for the CPU"
    ok, why = cuda_usable()
    if device == "cuda":
        if not ok:
            raise InputError(f"--device cuda: CUDA is not usable here ({why}); use --device cpu or auto")
        return CUDA_EP, "asked for CUDA"
    return (CUDA_EP, "a usable GPU was found") if ok else (CPU_EP, f"no usable CUDA: {why}")


def ort_session(model, providers=None, *, intra_op_threads: int | None = None, spinning: bool | None = None,
                log_severity: int = 3):
    """The one place an ONNX Runtime session is created. ``model``: a path, bytes or a ModelProto.

    ORT's own log stays quiet (severity 3): a CUDA EP that fails to load on a CPU-only machine is
    expected and reported by us in one line, not as a red ORT error. ``spinning=False`` stops idle
    intra-op threads from busy-waiting, which leaves the cores to decode workers between runs.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        so.intra_op_num_threads = cap_threads(intra_op_threads)
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = str(model)
    return ort.InferenceSession(model, so, providers=providers or [CPU_EP])


@dataclass
class Session:
    """An encoder session, the provider it really got, and why that provider."""

    session: object
    provider: str
    reason: str

    def __iter__(self):  # ``sess, provider = open_session(...)``
        return iter((self.session, self.provider))


def open_session(onnx_path: str | os.PathLike, device: str = "auto", *, intra_op_threads: int | None = None,
                 spinning: bool | None = None) -> Session:
    """A session for an exported encoder on ``device`` (resolved here, once), its contract, its
    manifest's agreement with the graph and its integrity digest checked."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise OptionError(f"--onnx: {onnx_path}: no such file")
    provider, why = resolve_device(device)
    providers = [CUDA_EP, CPU_EP] if provider == CUDA_EP else [CPU_EP]
    try:
        sess = ort_session(onnx_path, providers, intra_op_threads=intra_op_threads, spinning=spinning)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        problem = weight_file_problem(onnx_path)  # looked for only now: it parses the graph once more
        if problem:
            raise InputError(problem) from None
        raise InputError(f"{onnx_path}: ONNX Runtime cannot load this model ({str(e).splitlines()[0][:300]})") from e
    got = sess.get_providers()[0]
    if provider == CUDA_EP and got != CUDA_EP:
        if device == "cuda":
            raise InputError(f"--device cuda: the session fell back to {got} (CUDA EP did not load)")
        why = f"{provider} did not load"
    problem = contract_problem(sess)
    if problem:
        raise InputError(f"{onnx_path}: not an itae-export encoder: {problem} (see docs/onnx-contract.md)")
    # one truth for the model: the manifest agrees with the graph's metadata, the digest written at
    # export still matches, and the outputs have the shapes the manifest records
    manifest = read_manifest(onnx_path, verify=True)
    problem = output_problem(manifest, sess)
    if problem:
        raise InputError(f"{onnx_path}: the graph does not match its manifest: {problem}")
    return Session(sess, got, why)


def contract_problem(sess) -> str | None:
    """What in a session's inputs and outputs breaks the encoder contract, or None: input
    ``pixel_values`` float32/float16 [batch, 3, H, W] with a dynamic batch; output ``embedding``
    float32 [batch, D]; ``artifact_mask`` bool [batch, T-1] where present."""
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}
    x = inputs.get(INPUT_NAME)
    if x is None:
        return f"no input {INPUT_NAME!r} (inputs: {', '.join(inputs) or 'none'})"
    if len(inputs) != 1:
        return f"{len(inputs)} inputs ({', '.join(inputs)}); the contract has one, {INPUT_NAME!r}"
    if x.type not in ("tensor(float)", "tensor(float16)"):
        return f"input {INPUT_NAME!r} is {x.type}, not float32 or float16"
    if len(x.shape) != 4 or x.shape[1] != 3:
        return f"input {INPUT_NAME!r} has shape {x.shape}, not [batch, 3, H, W]"
    if isinstance(x.shape[0], int) and x.shape[0] > 0:
        return f"input {INPUT_NAME!r} has a fixed batch of {x.shape[0]}, not a dynamic one"
    emb = outputs.get(OUTPUT_EMBEDDING)
    if emb is None:
        return f"no output {OUTPUT_EMBEDDING!r} (outputs: {', '.join(outputs) or 'none'})"
    if emb.type != "tensor(float)" or len(emb.shape) != 2:
        return f"output {OUTPUT_EMBEDDING!r} is {emb.type} {emb.shape}, not float32 [batch, D]"
    mask = outputs.get(OUTPUT_MASK)
    if mask is not None and (mask.type != "tensor(bool)" or len(mask.shape) != 2):
        return f"output {OUTPUT_MASK!r} is {mask.type} {mask.shape}, not bool [batch, T-1]"
    return None


def run_onnx(path_or_session, x: np.ndarray, batch_size: int = 8, providers=None) -> dict[str, np.ndarray]:
    """All outputs of an encoder graph (a path, or a session) over pixels ``x``, in batches."""
    sess = path_or_session if hasattr(path_or_session, "run") else ort_session(path_or_session, providers)
    names = [o.name for o in sess.get_outputs()]
    chunks: dict[str, list] = {n: [] for n in names}
    for i in range(0, len(x), batch_size):
        for n, v in zip(names, sess.run(names, {INPUT_NAME: x[i : i + batch_size]})):
            chunks[n].append(v)
    return {n: np.concatenate(v) for n, v in chunks.items()}


class Embedder:
    """Runs batches of preprocessed float32 [B, 3, H, W] pixels through a session, returning [B, D] float32.

    On CUDA the input is copied to the GPU through IOBinding (cast to float16 first when the
    model's input is float16) and only the embedding output is fetched.
    """

    def __init__(self, session, provider: str):
        self.session = session
        self.provider = provider
        inp = next(i for i in session.get_inputs() if i.name == INPUT_NAME)
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self._x_gpu = self._binding = None  # reused across batches of the same shape
        self._names: list[str] = []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(pixels)[OUTPUT_EMBEDDING]

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, pixels: np.ndarray, extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """{``embedding`` as float32, and each output named in ``extra`` as the graph returns it}."""
        names = [OUTPUT_EMBEDDING, *(n for n in extra if n != OUTPUT_EMBEDDING)]
        x = np.ascontiguousarray(pixels, dtype=self.input_dtype)
        if self.provider == CUDA_EP:
            got = self._run_cuda(x, names)
        else:
            got = self.session.run(names, {INPUT_NAME: x})
        out = dict(zip(names, got))
        out[OUTPUT_EMBEDDING] = np.asarray(out[OUTPUT_EMBEDDING], dtype=np.float32)
        return out

    def _run_cuda(self, x: np.ndarray, names: list[str]) -> list:
        import onnxruntime as ort

        if self._x_gpu is None or list(self._x_gpu.shape()) != list(x.shape) or self._names != names:
            # one device buffer and binding per batch shape (the last, short batch gets its own)
            self._x_gpu = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), x.dtype, "cuda", 0)
            self._binding = self.session.io_binding()
            self._binding.bind_ortvalue_input(INPUT_NAME, self._x_gpu)
            for n in names:
                self._binding.bind_output(n, "cpu")
            self._names = names
        self._x_gpu.update_inplace(x)
        self.session.run_with_iobinding(self._binding)
        return list(self._binding.copy_outputs_to_cpu())
