"""Checkpoint loading: read a file, detect its format from its keys, remap to our names, load strictly.

Every conversion is a pure function ``state_dict -> state_dict`` (timm ``checkpoint_filter_fn``
style). Formats (the string returned by :func:`read_checkpoint` / :func:`detect_format`):

- ``dinov2-hub``: the official DINOv2 ``.pth`` files; names already match ours.
- ``timm``: timm ``VisionTransformer`` state dicts (DINOv2 ``*_dinov2``/``*_reg4_dinov2``,
  DeiT III ``deit3_*``): ``reg_token``, ``ls1.gamma``, ``head.*`` dropped. timm's register models
  carry no CLS row in ``pos_embed`` (the CLS position is folded into ``cls_token``): a zero row
  is put back, which computes the same thing.
- ``deit-official``: the DeiT III ``.pth`` files, ``{"model": ...}`` with ``gamma_1``/``gamma_2``.
- ``hf-dinov2``: transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``, both the on-disk
  layout (``attention.attention.query``, ``mlp.weights_in``) and the in-memory layout of
  transformers 5 (``attention.q_proj``, ``mlp.gate_proj``/``up_proj``/``down_proj``); any prefix
  (``dinov2.``, ``model.``, ``backbone.``) is stripped and keys outside it (heads) are dropped.
- ``hf-clip``: transformers ``CLIPModel`` / ``CLIPVisionModel(WithProjection)``, with or without
  the ``vision_model.`` prefix; the text tower, ``logit_scale`` and ``position_ids`` are dropped.
- ``openai-clip`` (a TorchScript ``.pt`` archive, read by :mod:`safe unpickler <_TorchScriptUnpickler>`)
  and ``open-clip`` (a plain state dict): ``visual.conv1``, ``class_embedding``, ``proj`` [D, out].

The mask token of DINOv2 is unused at inference; formats that drop it (timm, ONNX exports) get a
zero mask token so that ``strict=True`` still holds for every other name.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from itae_export import files
from itae_export.errors import CheckpointError
from itae_export.files import sha256_of_files
from itae_export.model.vit import build_model
from itae_export.registry import ITAEOptions, ModelSpec, get_model_spec, list_models
from itae_export.weights import hub
from itae_export.weights.onnx_weights import hf_state_dict_from_onnx

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from itae_export.model.vit import VisionTransformer

FORMATS = ("dinov2-hub", "timm", "deit-official", "hf-dinov2", "hf-clip", "openai-clip", "open-clip")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".onnx", ".ckpt")
_MAX_LISTED = 8


def _short_list(names, limit: int = _MAX_LISTED) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def weights_identity(spec: ModelSpec, weights: str | os.PathLike | None) -> str:
    """What ``--weights`` names, as a stable string: the official URL, the hub repository, or the
    sha256 of a local file (or directory). Two exports with the same identity read the same weights."""
    if weights is None:
        return f"url:{spec.url}"
    w = str(weights)
    if w == "hf" or w.startswith("hf:"):
        return f"hf:{w[3:] or spec.hf_hub_id}"
    p = Path(w).expanduser()
    if not p.exists():
        raise CheckpointError(f"--weights: {w}: no such file or directory")
    return "sha256:" + sha256_file(p)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file; of a directory, :func:`~itae_export.files.sha256_of_files` over its
    weight files, sorted."""
    p = Path(path)
    return sha256_of_files(sorted(_weight_files_in_dir(p))) if p.is_dir() else files.sha256_file(p)


def _weight_files_in_dir(d: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            try:
                shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{d / index}: not a valid shard index ({e})") from None
            return [d / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [d / single]
    found = sorted(f for f in d.iterdir() if f.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    if len(found) == 1:
        return found
    raise CheckpointError(
        f"{d}: no model.safetensors, shard index or pytorch_model.bin in this directory"
        + (f" (several candidates: {_short_list(f.name for f in found)})" if found else "")
    )


@dataclass
class LoadedWeights:
    """Where the weights :func:`load_model` loaded came from (the tensors live in the model only)."""

    format: str
    pos_rule: str
    source: str  # the file or directory, or the URL it was downloaded from
    sha256: str
    path: str = ""  # the local file or directory that was read

    def info(self) -> dict:
        """The manifest's ``weights`` entry."""
        return {"source": str(self.source), "format": self.format, "sha256": self.sha256}


# ------------------------------------------------------------------ reading files


def _torch_load(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to unpickle (only tensors and plain containers are allowed, weights_only=True): {first}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint: {first}") from None
    return obj


def _unwrap(obj, path) -> dict:
    """Find the state dict inside a training checkpoint ({"model": ...}, {"state_dict": ...})."""
    import torch

    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for key in ("model", "state_dict", "model_state_dict", "module", "teacher"):
        if isinstance(obj.get(key), dict):
            return _unwrap(obj[key], path)
    raise CheckpointError(f"{path}: no tensors found (top-level keys: {_short_list(map(str, obj))})")


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read as safetensors: {str(e).splitlines()[0]}") from None


def _read_file(p: Path) -> tuple[dict, str | None]:
    """Raw tensors of one file, and a format when the container alone decides it."""
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return hf_state_dict_from_onnx(p), None
    if suffix == ".safetensors":
        return _read_safetensors(p), None
    if zipfile.is_zipfile(p) and is_torchscript_archive(p):
        return read_torchscript_state_dict(p), "openai-clip"
    return _unwrap(_torch_load(p), p), None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, str]:
    """The raw state dict of a checkpoint and its detected format.

    ``path``: a directory (config.json + model.safetensors, a sharded index, or pytorch_model.bin),
    or a ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` or ``.onnx`` file. Pickles are read with
    ``weights_only=True``; TorchScript archives through a restricted unpickler.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        raw: dict = {}
        for f in _weight_files_in_dir(p):
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in the index is missing")
            sd, _ = _read_file(f)
            raw.update(sd)
        fmt = None
    else:
        raw, fmt = _read_file(p)
    if not raw:
        raise CheckpointError(f"{p}: the checkpoint holds no tensors")
    detected, _ = detect_format(raw, source=str(p))
    if fmt == "openai-clip" and detected != "open-clip":
        raise CheckpointError(f"{p}: a TorchScript archive, but not an OpenAI CLIP model (keys look like {detected})")
    return raw, fmt or detected


# ------------------------------------------------------------------ TorchScript archives


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names)


_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class _ScriptObject:
    """Stands in for a ``__torch__.*`` TorchScript class: it only records its attributes."""

    __slots__ = ("type_name", "attrs")

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state of {self.type_name}: {type(state).__name__}")
        self.attrs = state


def _script_class(qualname: str):
    return type("ScriptObject", (_ScriptObject,), {"__slots__": (), "type_name": qualname})


class _StorageType:
    def __init__(self, dtype_name: str):
        self.dtype_name = dtype_name


class _TorchScriptUnpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers only; any other global is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.source = source
        self.storages: dict[str, "torch.Tensor"] = {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _script_class(f"{module}.{name}")
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            dtype = getattr(torch, stype.dtype_name)
            try:
                data = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
            flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
            if flat.numel() < numel:
                raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} elements, expected {numel}")
            self.storages[key] = flat
        return self.storages[key]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    import torch

    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("tensor without a storage")
    return storage.as_strided(tuple(size), tuple(stride), int(storage_offset))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _collect_tensors(obj, prefix: str, out: dict, depth: int = 0) -> None:
    import torch

    if depth > 64:
        raise pickle.UnpicklingError("module tree too deep")
    items = obj.attrs.items() if isinstance(obj, _ScriptObject) else obj.items() if isinstance(obj, dict) else ()
    for name, value in items:
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            out[key] = value.clone()
        elif isinstance(value, (_ScriptObject, dict)):
            _collect_tensors(value, key + ".", out, depth + 1)


def read_torchscript_state_dict(path: str | os.PathLike) -> dict:
    """The tensors of a TorchScript archive (e.g. OpenAI's CLIP ``.pt``), keyed by attribute path.

    Reads ``<archive>/data.pkl`` with a restricted unpickler: ``__torch__.*`` classes become inert
    attribute records (no code in the archive runs), tensors are rebuilt from the raw storages,
    and every other global is refused.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            data_pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(data_pkls) != 1:
                raise CheckpointError(f"{p}: not a TorchScript archive (no unique <name>/data.pkl)")
            prefix = data_pkls[0].rsplit("/", 1)[0]
            byteorder = f"{prefix}/byteorder"
            if byteorder in z.namelist() and z.read(byteorder).strip() not in (b"little",):
                raise CheckpointError(f"{p}: big-endian TorchScript archives are not supported")
            unpickler = _TorchScriptUnpickler(io.BytesIO(z.read(data_pkls[0])), z, prefix, str(p))
            try:
                root = unpickler.load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                raise CheckpointError(f"{p}: refused to read the TorchScript archive: {e}") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{p}: not a zip archive ({e})") from None
    out: dict = {}
    _collect_tensors(root, "", out)
    if not out:
        raise CheckpointError(f"{p}: the TorchScript archive holds no tensors")
    return out


# ------------------------------------------------------------------ detection


def _find_prefix(keys, anchor: str) -> str | None:
    hits = [k[: -len(anchor)] for k in keys if k.endswith(anchor) and (len(k) == len(anchor) or k[-len(anchor) - 1] == ".")]
    if not hits:
        return None
    return min(hits, key=len)


def detect_format(raw_sd: dict, source: str = "checkpoint") -> tuple[str, str]:
    """The format of a raw state dict, from its keys, and the prefix its backbone keys carry."""
    keys = list(raw_sd)
    if (pre := _find_prefix(keys, "embeddings.patch_embeddings.projection.weight")) is not None:
        return "hf-dinov2", pre
    if (pre := _find_prefix(keys, "embeddings.patch_embedding.weight")) is not None:
        return "hf-clip", pre
    if (pre := _find_prefix(keys, "conv1.weight")) is not None and f"{pre}class_embedding" in raw_sd:
        return "open-clip", pre
    if (pre := _find_prefix(keys, "patch_embed.proj.weight")) is not None:
        own = [k[len(pre):] for k in keys if k.startswith(pre)]
        if any(re.search(r"(^|\.)gamma_[12]$", k) for k in own):
            return "deit-official", pre
        if "mask_token" in own and "reg_token" not in own:
            return "dinov2-hub", pre
        return "timm", pre
    raise CheckpointError(f"{source}: unrecognised checkpoint layout (first keys: {_short_list(keys, 6)})")


# ------------------------------------------------------------------ conversion


def _block_rename(table: list[tuple[str, str]], name: str) -> str | None:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


_HF_DINOV2 = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:weights_out|down_proj)\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
]
# q, k, v as separate Linear layers (packed into our qkv), and the split SwiGLU gate/up of transformers 5
_HF_DINOV2_QKV = r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
_HF_DINOV2_GATE_UP = r"^encoder\.layer\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)$"

_HF_CLIP = [
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^pre_layrnorm\.", "norm_pre."),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^post_layernorm\.", "norm."),
]
_HF_CLIP_QKV = r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$"

_OPEN_CLIP = [
    (r"^conv1\.", "patch_embed.proj."),
    (r"^ln_pre\.", "norm_pre."),
    (r"^transformer\.resblocks\.(\d+)\.ln_([12])\.", r"blocks.\1.norm\2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^ln_post\.", "norm."),
]


def _strip(raw_sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in raw_sd.items() if k.startswith(prefix)}


def _pack(groups: dict, order: tuple[str, ...], fmt: str, out: dict, target: str) -> None:
    """Concatenate separate projections (q,k,v or gate,up) along dim 0 into one packed Linear."""
    import torch

    for (layer, kind), parts in groups.items():
        if set(parts) != set(order):
            missing = [o for o in order if o not in parts]
            raise CheckpointError(f"{fmt}: layer {layer} {kind} lacks {', '.join(missing)}")
        out[target.format(layer=layer, kind=kind)] = torch.cat([parts[o] for o in order], dim=0)


def _convert_hf_dinov2(sd: dict) -> tuple[dict, list[str]]:
    out, unknown = {}, []
    qkv: dict = {}
    gate_up: dict = {}
    alias = {"query": "q", "key": "k", "value": "v"}
    for k, v in sd.items():
        if m := re.match(_HF_DINOV2_QKV, k):
            which = alias.get(m.group(2) or "", m.group(3))
            qkv.setdefault((m.group(1), m.group(4)), {})[which] = v
        elif m := re.match(_HF_DINOV2_GATE_UP, k):
            gate_up.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        elif (new := _block_rename(_HF_DINOV2, k)) is not None:
            out[new] = v
        else:
            unknown.append(k)
    _pack(qkv, ("q", "k", "v"), "hf-dinov2", out, "blocks.{layer}.attn.qkv.{kind}")
    _pack(gate_up, ("gate", "up"), "hf-dinov2", out, "blocks.{layer}.mlp.w12.{kind}")
    return out, unknown


def _convert_hf_clip(raw_sd: dict, prefix: str) -> tuple[dict, list[str]]:
    # prefix is where `embeddings.` starts: "" (CLIPVisionModel, transformers 5) or "vision_model."
    root = prefix[: -len("vision_model.")] if prefix.endswith("vision_model.") else prefix
    out, unknown = {}, []
    qkv: dict = {}
    for k, v in _strip(raw_sd, prefix).items():
        if k == "embeddings.position_ids":
            continue
        if k == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
        elif m := re.match(_HF_CLIP_QKV, k):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        elif (new := _block_rename(_HF_CLIP, k)) is not None:
            out[new] = v
        elif k.startswith(("text_model.", "text_projection.", "visual_projection.")) or k == "logit_scale":
            continue  # a CLIPVisionModel saved with no prefix sits at the root with these
        else:
            unknown.append(k)
    if f"{root}visual_projection.weight" in raw_sd:
        out["head.weight"] = raw_sd[f"{root}visual_projection.weight"]
    _pack(qkv, ("q", "k", "v"), "hf-clip", out, "blocks.{layer}.attn.qkv.{kind}")
    return out, unknown


def _convert_open_clip(sd: dict) -> tuple[dict, list[str]]:
    out, unknown = {}, []
    for k, v in sd.items():
        if k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        elif k == "proj":
            out["head.weight"] = v.t().contiguous()  # x @ proj == Linear(weight=proj.T)
        elif (new := _block_rename(_OPEN_CLIP, k)) is not None:
            out[new] = v
        else:
            unknown.append(k)
    return out, unknown


def _convert_timm_like(sd: dict, fmt: str, spec: ModelSpec) -> tuple[dict, list[str]]:
    out, dropped = {}, []
    for k, v in sd.items():
        if k.startswith(("head.", "head_dist.")):  # classifier heads; our DeiT/DINOv2 embedding is the CLS token
            dropped.append(k)
            continue
        k = re.sub(r"^blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma", k)
        if k == "reg_token":
            k = "register_tokens"
        if spec.arch.ffn == "swiglu":  # timm packs DINOv2's w12/w3 as fc1/fc2 (SwiGLUPacked, gate first)
            k = re.sub(r"^(blocks\.\d+\.mlp\.)fc1\.", r"\1w12.", k)
            k = re.sub(r"^(blocks\.\d+\.mlp\.)fc2\.", r"\1w3.", k)
        out[k] = v
    return out, []


def convert_state_dict(raw_sd: dict, fmt: str, spec: ModelSpec | str) -> dict:
    """A raw state dict of format ``fmt`` renamed to our parameter names (pure; tensors are shared)."""
    import torch

    spec = get_model_spec(spec) if isinstance(spec, str) else spec
    detected, prefix = detect_format(raw_sd)
    if fmt == "openai-clip":
        fmt_family = "open-clip"
    else:
        fmt_family = fmt
    if fmt_family != detected:
        raise CheckpointError(f"checkpoint keys look like {detected}, not {fmt}")
    if fmt == "hf-dinov2":
        out, unknown = _convert_hf_dinov2(_strip(raw_sd, prefix))
    elif fmt == "hf-clip":
        out, unknown = _convert_hf_clip(raw_sd, prefix)
    elif fmt_family == "open-clip":
        out, unknown = _convert_open_clip(_strip(raw_sd, prefix))
    elif fmt in ("timm", "deit-official", "dinov2-hub"):
        out, unknown = _convert_timm_like(_strip(raw_sd, prefix), fmt, spec)
    else:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    if unknown:
        raise CheckpointError(f"{fmt} checkpoint has keys with no counterpart: {_short_list(unknown)}")

    a = spec.arch
    # timm's register models fold the CLS position into cls_token and drop its row: put back a zero row
    if a.pos_embed_cls and "pos_embed" in out and "cls_token" in out:
        n = out["pos_embed"].shape[1]
        if int(round(n**0.5)) ** 2 == n:
            pe = out["pos_embed"]
            out["pos_embed"] = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
    if a.mask_token and "mask_token" not in out and "cls_token" in out:
        out["mask_token"] = out["cls_token"].new_zeros(1, out["cls_token"].shape[-1])  # unused at inference
    if "mask_token" in out and out["mask_token"].ndim == 2 and not a.mask_token:
        out.pop("mask_token")
    if "mask_token" in out and out["mask_token"].ndim != 2:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in out.items()}


def default_pos_rule(fmt: str, spec: ModelSpec | str) -> str:
    """The position-embedding interpolation rule of the implementation the weights came from."""
    spec = get_model_spec(spec) if isinstance(spec, str) else spec
    if fmt == "dinov2-hub":
        return spec.pos_rule
    if fmt in ("hf-dinov2", "hf-clip"):
        return spec.hf_pos_rule or spec.pos_rule
    if fmt in ("timm", "deit-official", "open-clip", "openai-clip"):
        return "bicubic-aa"
    raise CheckpointError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")


# ------------------------------------------------------------------ architecture checks and loading


def describe_state_dict(sd: dict) -> dict:
    """Architecture facts of a converted state dict: width, depth, patch, registers, pos grid, ffn."""
    w = sd.get("patch_embed.proj.weight")
    depth = len({m.group(1) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})
    info = {
        "embed_dim": int(w.shape[0]) if w is not None else None,
        "patch_size": int(w.shape[-1]) if w is not None else None,
        "depth": depth,
        "num_register_tokens": int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0,
        "ffn": "swiglu" if any(".mlp.w12." in k for k in sd) else "mlp",
        "proj_dim": int(sd["head.weight"].shape[0]) if "head.weight" in sd else None,
    }
    pe = sd.get("pos_embed")
    if pe is not None:
        n = pe.shape[1] - (1 if "cls_token" in sd and int(round((pe.shape[1] - 1) ** 0.5)) ** 2 == pe.shape[1] - 1 else 0)
        info["pos_grid"] = int(round(n**0.5))
    return info


def _arch_of(spec: ModelSpec) -> dict:
    a = spec.arch
    return {"embed_dim": a.embed_dim, "patch_size": a.patch_size, "depth": a.depth,
            "num_register_tokens": a.num_register_tokens, "ffn": a.ffn, "proj_dim": a.proj_dim}


def check_architecture(sd: dict, spec: ModelSpec, source: str) -> None:
    """Raise a clear CheckpointError when the weights are of another architecture than ``spec``."""
    have = describe_state_dict(sd)
    want = _arch_of(spec)
    diff = [k for k in want if have.get(k) != want[k]]
    if not diff:
        return
    matches = [n for n in list_models() if _arch_of(get_model_spec(n)) == {k: have.get(k) for k in want}]
    fmt = lambda d: ", ".join(f"{k}={d.get(k)}" for k in want)  # noqa: E731
    hint = f"; it looks like {' or '.join(matches)}" if matches else ""
    raise CheckpointError(
        f"{source}: the checkpoint's architecture does not match model {spec.name}: "
        f"checkpoint {fmt(have)}; {spec.name} needs {fmt(want)}{hint}"
    )


def load_state_dict_strict(model, sd: dict, source: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` with one clear line on any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (checkpoint vs model): {_short_list(shapes, 4)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


def load_model(
    spec_or_name: ModelSpec | str,
    itae: ITAEOptions | None = None,
    weights: str | os.PathLike | None = None,
    pos_rule: str | None = None,
    download: bool = True,
) -> tuple["VisionTransformer", LoadedWeights]:
    """Build ``spec_or_name`` with ITAE injected (``itae=None``: unpatched) and load its weights.

    ``weights``: a local checkpoint (any format of :func:`read_checkpoint`); ``None`` fetches the
    official file (``spec.url``, torch hub cache); ``"hf"`` or ``"hf:<repo>"`` fetches the Hugging
    Face repository (hub cache). ``pos_rule`` overrides :func:`default_pos_rule`. A checkpoint whose
    position grid differs from the registry's (e.g. timm at 224) keeps its own grid.
    """
    import dataclasses


    spec = get_model_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    if weights is None:
        path, source = hub.fetch_official(spec, download=download)
    elif str(weights) == "hf" or str(weights).startswith("hf:"):
        repo = str(weights)[3:] or None
        path, source = hub.fetch_hf(spec, repo_id=repo, download=download)
    else:
        path = Path(os.path.abspath(Path(weights).expanduser()))  # itae-validate may run from elsewhere
        source = str(path)
    raw, fmt = read_checkpoint(path)
    sd = convert_state_dict(raw, fmt, spec)
    del raw
    check_architecture(sd, spec, str(path))
    grid = describe_state_dict(sd).get("pos_grid")
    if grid and grid != spec.arch.pos_grid:
        spec = dataclasses.replace(spec, arch=dataclasses.replace(spec.arch, pos_grid=grid))
    rule = pos_rule or default_pos_rule(fmt, spec)
    model = build_model(spec, itae, pos_rule=rule)
    load_state_dict_strict(model, sd, str(path))
    model.eval()
    return model, LoadedWeights(format=fmt, pos_rule=rule, source=source, sha256=sha256_file(path), path=str(path))
