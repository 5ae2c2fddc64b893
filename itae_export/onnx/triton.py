"""A model repository for NVIDIA Triton Inference Server from an exported graph.

:func:`write_triton_repository` lays out ``REPO/<name>/1/model.onnx`` (with its external data
file beside it when the weights are external), ``REPO/<name>/config.pbtxt`` for the
``onnxruntime_onnx`` backend, and the manifest as ``REPO/<name>/model.json``. The config lists
every input and output with its Triton type and dims (without the batch axis, which
``max_batch_size`` adds), enables dynamic batching and keeps the bool ``artifact_mask``
output as ``TYPE_BOOL``. :func:`check_config` parses the text with Triton's own protobuf
definitions (``tritonclient.grpc.model_config_pb2``) and compares it with the graph.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from itae_export.errors import InputError, MissingDependencyError, OptionError
from itae_export.files import atomic_write_bytes, atomic_write_json, check_writable, ensure_dir
from itae_export.onnx.contract import MAX_BATCH
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import ort_session

DEFAULT_MAX_BATCH = 64
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
                "int64": "TYPE_INT64"}
_ORT_TO_DTYPE = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
                 "tensor(bool)": "bool", "tensor(int64)": "int64"}
# a model folder name: no '.', '..' or hidden name, no separator
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
INSTALL_HINT = "pip install 'tritonclient[grpc]'"


def tritonclient_available() -> bool:
    """Whether Triton's protobuf definitions (the config check) can be imported."""
    try:
        from tritonclient.grpc import model_config_pb2  # noqa: F401
    except ImportError:
        return False
    return True


def check_model_name(name: str) -> None:
    """A Triton model name that is one safe folder name (not '.', '..', hidden or with a separator)."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise OptionError(f"--triton: model name {name!r} (the output's stem) may hold only letters, digits, '_', '.' "
                          "and '-', and must not start with '.'; choose another --output name")


def check_repository(repo: str | os.PathLike, names: list[str]) -> None:
    """Everything about a ``--triton`` target that can be checked before an export starts: the
    model names, and that ``repo`` is (or can be made) a writable folder. Creates nothing."""
    for name in names:
        check_model_name(name)
    check_writable(repo, "--triton", folder=True)


def _dims(shape: list) -> list[int]:
    """Dims after the batch axis; symbolic ones (height, width) are -1."""
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


def config_text(name: str, manifest: dict, max_batch_size: int = DEFAULT_MAX_BATCH,
                max_queue_delay_us: int = 2000, instance_kind: str = "KIND_AUTO") -> str:
    """config.pbtxt for the model of ``manifest`` (its ``inputs`` and ``outputs`` tables)."""
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', 'backend: "onnxruntime"',
             f"max_batch_size: {max_batch_size}"]

    def tensor(kind: str, t: dict) -> None:
        if t["dtype"] not in TRITON_TYPES:
            raise InputError(f"{t['name']}: dtype {t['dtype']!r} has no Triton type here")
        dims = ", ".join(str(d) for d in _dims(t["shape"]))
        lines.extend([f"{kind} [", "  {", f'    name: "{t["name"]}"', f"    data_type: {TRITON_TYPES[t['dtype']]}",
                      f"    dims: [ {dims} ]", "  }", "]"])

    for t in manifest["inputs"]:
        tensor("input", t)
    for t in manifest["outputs"]:
        tensor("output", t)
    lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}",
              f"instance_group [ {{ count: 1, kind: {instance_kind} }} ]"]
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """The ModelConfig message of a config.pbtxt, parsed with Triton's protobuf definitions."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise MissingDependencyError(f"checking a Triton config needs tritonclient ({INSTALL_HINT}; {e})") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise InputError(f"config.pbtxt does not parse as a Triton ModelConfig: {e}") from e


def check_config(model_dir: str | os.PathLike, name: str | None = None) -> dict:
    """Parse ``model_dir/config.pbtxt`` with Triton's protobuf and compare it with the graph at
    ``model_dir/1/model.onnx`` as ONNX Runtime sees it (names, types, dims); the model's name must be
    ``name`` (default: the folder's). Returns a summary."""
    from tritonclient.grpc import model_config_pb2 as pb

    model_dir = Path(model_dir)
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    sess = ort_session(model_dir / "1" / "model.onnx")
    problems = []
    name = name or model_dir.name
    if cfg.name != name:
        problems.append(f"name {cfg.name!r} is not the model folder's name {name!r}")
    if cfg.platform != "onnxruntime_onnx":
        problems.append(f"platform {cfg.platform!r}")
    for kind, declared, actual in (("input", cfg.input, sess.get_inputs()), ("output", cfg.output, sess.get_outputs())):
        graph = {a.name: a for a in actual}
        if sorted(d.name for d in declared) != sorted(graph):
            problems.append(f"{kind}s {[d.name for d in declared]} against the graph's {sorted(graph)}")
            continue
        for d in declared:
            a = graph[d.name]
            want = TRITON_TYPES.get(_ORT_TO_DTYPE.get(a.type, ""), "?")
            if pb.DataType.Name(d.data_type) != want:
                problems.append(f"{d.name}: {pb.DataType.Name(d.data_type)} but the graph has {a.type}")
            graph_dims = [x if isinstance(x, int) else -1 for x in a.shape[1:]]
            if list(d.dims) != graph_dims:
                problems.append(f"{d.name}: dims {list(d.dims)} but the graph has {graph_dims}")
    if not cfg.HasField("dynamic_batching"):
        problems.append("no dynamic_batching")
    if problems:
        raise InputError(f"{model_dir / 'config.pbtxt'}: " + "; ".join(problems))
    return {"name": cfg.name, "max_batch_size": cfg.max_batch_size,
            "inputs": {t.name: [pb.DataType.Name(t.data_type), list(t.dims)] for t in cfg.input},
            "outputs": {t.name: [pb.DataType.Name(t.data_type), list(t.dims)] for t in cfg.output}}


def write_triton_repository(onnx_path: str | os.PathLike, repo: str | os.PathLike, *, name: str | None = None,
                            max_batch_size: int = DEFAULT_MAX_BATCH, check: bool | None = None) -> Path:
    """Write ``repo/<name>/`` for Triton from an exported graph (plain or in-graph preprocessing);
    returns that folder. An existing ``repo/<name>/`` is replaced only once the new one is complete.

    ``check``: parse the config with Triton's protobuf and compare it with the graph; None (the
    default) checks where tritonclient is installed and writes the config unchecked otherwise
    (True without tritonclient is an error naming what to install)."""
    if check is None:
        check = tritonclient_available()
    elif check and not tritonclient_available():
        raise MissingDependencyError(f"--triton: checking config.pbtxt needs tritonclient ({INSTALL_HINT})")
    onnx_path = Path(onnx_path)
    manifest = read_manifest(onnx_path, verify=True)  # publish only a graph that is what it was exported as
    name = name or onnx_path.stem
    check_model_name(name)
    if not 1 <= max_batch_size <= MAX_BATCH:
        raise InputError(f"max_batch_size {max_batch_size} is not in 1..{MAX_BATCH}")
    repo = ensure_dir(repo, "--triton")
    tmp = Path(tempfile.mkdtemp(dir=repo, prefix=f".{name}.", suffix=".tmp"))
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(onnx_path, tmp / "1" / "model.onnx")
        data = manifest.get("external_data")
        if data:  # ONNX Runtime looks for it beside model.onnx under the name recorded in the graph
            shutil.copyfile(onnx_path.parent / data, tmp / "1" / data)
        atomic_write_bytes(tmp / "config.pbtxt", config_text(name, manifest, max_batch_size).encode())
        atomic_write_json(tmp / "model.json", manifest)
        if check:
            check_config(tmp, name)
        final = repo / name
        if final.exists():
            old = repo / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return repo / name
