"""The exported model's contract: graph names, and the sidecar manifest beside every .onnx file.

The same manifest dictionary is stored, as JSON, in the model's ``metadata_props`` under the
key ``itae.manifest``. Readers (itae-cluster, non-Python users) take the preprocessing from it.

One truth for the model (issue 22): the graph also carries flat copies of a few fields
(``itae.preprocessing``, ``itae.model``, ``itae.theta``, ``itae.enabled``: :func:`flat_metadata`)
and an integrity digest (``itae.integrity``: :func:`integrity_digest`) over the graph and all its
other metadata, written by :func:`seal` at export. :func:`read_manifest` refuses a manifest whose
flat copies or sidecar disagree with it, naming the field; :func:`read_manifest` with ``verify`` (where
a session is opened) refuses a graph or manifest changed after export, and :func:`output_problem`
a graph whose outputs do not have the shapes its manifest records (a foreign graph with a copied
manifest). The digest is a checksum against accidents and hand edits, not a signature: whoever
can write the file can reseal it. External weight files are covered through the manifest: it
records the sha256 of each (``external_data_sha256``, :func:`seal_with_weights`), and the check
hashes them again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from pathlib import Path

from itae_export.errors import InputError, UnknownModelError
from itae_export.files import atomic_write_json, sha256_file
from itae_export.onnx.contract import INPUT_NAME, MANIFEST_SCHEMA, MANIFEST_SUFFIX, METADATA_KEY
from itae_export.registry import get_model_spec

INTEGRITY_KEY = "itae.integrity"
EXTERNAL_DIGESTS = "external_data_sha256"  # manifest field: {weights file name: "sha256:..."}


def manifest_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.json``."""
    p = Path(onnx_path)
    return p.with_suffix(MANIFEST_SUFFIX)


def write_manifest(onnx_path: str | os.PathLike, manifest: dict) -> Path:
    path = manifest_path(onnx_path)
    atomic_write_json(path, manifest)
    return path


def flat_metadata(manifest: dict) -> dict[str, str]:
    """The graph's metadata entries besides the manifest and the digest: copies of a few of its
    fields that ONNX tools show without parsing JSON."""
    return {
        METADATA_KEY: json.dumps(manifest, sort_keys=True),
        "itae.model": manifest["model"],
        "itae.theta": str(manifest["itae"]["theta"]),
        "itae.enabled": str(manifest["itae"]["enabled"]).lower(),
        "itae.preprocessing": json.dumps(manifest["preprocessing"], sort_keys=True),
    }


def integrity_digest(proto) -> str:
    """sha256 over the graph (deterministic serialization, without metadata) and its metadata
    entries other than the digest itself, in key order."""
    import onnx

    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.metadata_props[:]
    h = hashlib.sha256(bare.SerializeToString(deterministic=True))
    for p in sorted(proto.metadata_props, key=lambda p: p.key):
        if p.key != INTEGRITY_KEY:
            h.update(b"\0" + p.key.encode() + b"\0" + p.value.encode())
    return "sha256:" + h.hexdigest()


def seal(proto, manifest: dict) -> None:
    """Write ``manifest`` into the graph's metadata (with :func:`flat_metadata`), then the digest
    over the graph as it now is. Call it last, after every other change to ``proto``."""
    del proto.metadata_props[:]
    for k, v in flat_metadata(manifest).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    digest = integrity_digest(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = INTEGRITY_KEY, digest


def graph_tensors(proto):
    """Every tensor of the main graph that can hold weights: initializers and node attributes."""
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t


def external_locations(proto) -> list[str]:
    """The file names the graph's tensors keep their data in (ONNX external data), sorted."""
    return sorted({e.value for t in graph_tensors(proto) for e in t.external_data if e.key == "location"})


def file_sha256(path: str | os.PathLike) -> str:
    return "sha256:" + sha256_file(path, chunk=1 << 22)


def seal_with_weights(proto, manifest: dict, folder: str | os.PathLike) -> None:
    """:func:`seal`, with the sha256 of each external weight file (in ``folder``, beside the graph)
    recorded first in ``manifest`` (``external_data_sha256``), so the digest covers the weights too."""
    manifest.pop(EXTERNAL_DIGESTS, None)
    locations = external_locations(proto)
    if locations:
        manifest[EXTERNAL_DIGESTS] = {loc: file_sha256(Path(folder) / loc) for loc in locations}
    seal(proto, manifest)


def weight_file_problem(onnx_path: str | os.PathLike, proto=None) -> str | None:
    """Why the graph's external weight files cannot be read beside it (a name that is not a plain
    file name, or a file that is missing), as one line, or None."""
    onnx_path = Path(onnx_path)
    if proto is None:
        try:
            proto = _load(onnx_path)
        except InputError as e:
            return str(e)
    for loc in external_locations(proto):
        if not loc or Path(loc).name != loc or loc in (".", ".."):
            return f"{onnx_path}: its weights are kept in {loc!r}, not a file name beside the graph; export the model again"
        if not (onnx_path.parent / loc).is_file():
            return f"{onnx_path}: its weight file {loc} is not beside it (move the two files together)"
    return None


def _check_external(proto, manifest: dict, onnx_path: Path) -> None:
    """Each external weight file of the graph: a plain name beside it, present, and with the sha256
    the manifest recorded at export."""
    problem = weight_file_problem(onnx_path, proto)
    if problem:
        raise InputError(problem)
    recorded = manifest.get(EXTERNAL_DIGESTS)
    for loc in external_locations(proto):
        data = onnx_path.parent / loc
        if not isinstance(recorded, dict) or not isinstance(recorded.get(loc), str):
            raise InputError(f"{onnx_path}: the manifest records no digest of its weight file {loc} (exported by an "
                             "earlier version): export the model again")
        if not hmac.compare_digest(recorded[loc].encode(), file_sha256(data).encode()):
            raise InputError(f"{data}: the weights differ from those exported with {onnx_path.name} (the file was "
                             "changed or replaced after export); export the model again")


def reseal(proto) -> None:
    """Recompute the digest of a graph that was changed on purpose (a head merged in)."""
    for p in proto.metadata_props:
        if p.key == INTEGRITY_KEY:
            p.value = integrity_digest(proto)


def _load(onnx_path: Path):
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise InputError(f"{onnx_path}: not a readable ONNX model (truncated or not ONNX: {type(e).__name__})") from None


def _check_digest(proto, onnx_path) -> None:
    meta = {p.key: p.value for p in proto.metadata_props}
    if INTEGRITY_KEY not in meta:
        raise InputError(f"{onnx_path}: no integrity digest ('{INTEGRITY_KEY}'); it was not written by this "
                         "itae-export, or was edited: export the model again")
    if not hmac.compare_digest(meta[INTEGRITY_KEY].encode(), integrity_digest(proto).encode()):
        raise InputError(f"{onnx_path}: the integrity digest ('{INTEGRITY_KEY}') does not match: the graph or its "
                         "manifest was changed after export; export the model again")


def output_problem(manifest: dict, sess) -> str | None:
    """Where a session's outputs differ from the shapes the manifest records (``embed_dim``,
    ``outputs``), or None. A foreign graph with a copied manifest fails here."""
    outs = {o.name: o for o in sess.get_outputs()}
    recorded = manifest.get("outputs")
    if not isinstance(recorded, list) or not recorded:
        return "the manifest records no outputs"
    dim = manifest.get("embed_dim")
    for rec in recorded:
        if not isinstance(rec, dict) or not isinstance(rec.get("shape"), list):
            return "the manifest's 'outputs' are malformed"
        o = outs.get(rec.get("name"))
        if o is None:
            return f"the manifest records an output {rec.get('name')!r} that the graph lacks"
        want, got = rec["shape"], list(o.shape)
        if len(want) != len(got):
            return f"output {o.name!r} has rank {len(got)}, the manifest says {len(want)} ({want})"
        for axis, (w, g) in enumerate(zip(want, got)):
            if isinstance(w, int) and isinstance(g, int) and w != g:
                return f"output {o.name!r} axis {axis} is {g}, the manifest says {w}"
    emb = next((r for r in recorded if r.get("name") == "embedding"), None)
    if emb is not None and (not isinstance(dim, int) or emb["shape"][-1] != dim):
        return f"the manifest's embed_dim {dim!r} differs from its embedding output {emb['shape']}"
    return None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _float32(x) -> float:
    """``x`` as the float32 the preprocessing computes with (inf where it overflows)."""
    import numpy as np

    with np.errstate(over="ignore"):
        return float(np.float32(x))


def input_problem(manifest: dict, proto) -> str | None:
    """Where the graph's declared image input differs from the manifest's ``preprocessing.resolution``
    (a resealed manifest saying 100000 for a 56x56 graph: every image would be resized to 120 GB
    before ONNX Runtime refused it), or None. Read from the graph's header: no session needed."""
    graph_inputs = {i.name: i for i in proto.graph.input}
    i = graph_inputs.get(INPUT_NAME)
    if i is None:
        return None  # the contract check names a missing input when the session opens
    dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
    want = manifest["preprocessing"]["resolution"]
    if len(dims) == 4 and all(isinstance(d, int) for d in dims[2:]) and dims[2:] != list(want):
        return (f"input {INPUT_NAME!r} takes {dims[2]}x{dims[3]} images, the manifest's preprocessing.resolution "
                f"says {want[0]}x{want[1]}")
    return None


def field_problem(manifest: dict) -> str | None:
    """The first field a reader relies on that is missing or of the wrong kind (a forged or
    hand-edited manifest), as "'field': why", or None."""
    def pos_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    if manifest.get("schema") != MANIFEST_SCHEMA:
        return f"'schema': {manifest.get('schema')!r} is not {MANIFEST_SCHEMA}"
    if not isinstance(manifest.get("model"), str) or not manifest["model"]:
        return "'model': not a name"
    prep = manifest.get("preprocessing")
    if not isinstance(prep, dict):
        return "'preprocessing': not an object"
    for key in ("mean", "std"):  # finite as the float32 they are used as
        v = prep.get(key)
        if not isinstance(v, list) or len(v) != 3 or not all(_finite(x) and math.isfinite(_float32(x)) for x in v):
            return f"'preprocessing.{key}': not 3 finite numbers"
    if not all(_float32(x) > 0 for x in prep["std"]):
        return "'preprocessing.std': not all > 0 (in float32)"
    res = prep.get("resolution")
    if not isinstance(res, list) or len(res) != 2 or not all(pos_int(x) for x in res):
        return "'preprocessing.resolution': not [height, width] in pixels"
    if "scale" in prep and not (_finite(prep["scale"]) and _float32(prep["scale"]) > 0
                                and math.isfinite(_float32(255 * prep["scale"]))):
        return "'preprocessing.scale': not a positive number (255 times it finite in float32)"
    if not pos_int(manifest.get("embed_dim")):
        return "'embed_dim': not a positive integer"
    itae = manifest.get("itae")
    if not isinstance(itae, dict) or not _finite(itae.get("theta")) or not isinstance(itae.get("enabled"), bool):
        return "'itae': not an object with a finite theta and a boolean enabled"
    for key in ("inputs", "outputs"):
        v = manifest.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                       and isinstance(t.get("shape"), list) for t in v):
            return f"'{key}': not a list of {{name, dtype, shape}}"
    return None


def registry_difference(manifest: dict) -> str | None:
    """For a model of the registry: the first preprocessing field (resolution aside, which an
    export may choose) where the manifest differs from the registry's, or None. Unregistered
    models have no second source to compare with."""
    try:
        spec = get_model_spec(manifest["model"])
    except (UnknownModelError, KeyError, TypeError):
        return None
    want = json.loads(json.dumps(spec.preprocessing.to_dict()))
    got = manifest.get("preprocessing")
    if not isinstance(got, dict):
        return "preprocessing"
    for key in sorted(want):
        if key == "resolution":
            continue
        if key not in got:
            return f"preprocessing.{key}"
        d = first_difference(got[key], want[key], f"preprocessing.{key}.")
        if d is not None:
            return d
    return None


def read_manifest(onnx_path: str | os.PathLike, *, verify: bool = False) -> dict:
    """The manifest of an exported model. The copy inside the graph (``metadata_props``) is the
    authority; the graph's flat metadata (:func:`flat_metadata`) or a sidecar ``<stem>.json`` that
    disagrees with it is an InputError naming the field. ``verify``: check the integrity digest
    too (hashes the graph; done once where a session is opened)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: no such ONNX file")
    proto = _load(onnx_path)
    embedded = _embedded(proto, onnx_path)
    side = manifest_path(onnx_path)
    if embedded is None:
        raise InputError(f"{onnx_path}: not an itae-export model (the graph carries no '{METADATA_KEY}' metadata)")
    field = _flat_difference(proto, embedded)
    if field is not None:
        raise InputError(f"{onnx_path}: the graph's metadata '{field}' differs from its embedded manifest; the "
                         "model was edited after export: export it again")
    problem = field_problem(embedded)
    if problem is not None:
        raise InputError(f"{onnx_path}: the manifest's {problem}; export the model again")
    problem = input_problem(embedded, proto)
    if problem is not None:
        raise InputError(f"{onnx_path}: the graph does not match its manifest: {problem}")
    if verify:
        _check_digest(proto, onnx_path)
        _check_external(proto, embedded, onnx_path)
    if side.is_file():
        try:
            sidecar = json.loads(side.read_text())
        except (ValueError, OSError) as e:
            raise InputError(f"{side}: the manifest is not valid JSON ({e})") from None
        field = first_difference(embedded, sidecar)
        if field is not None:
            raise InputError(f"{side}: field '{field}' differs from the manifest inside {onnx_path.name}, which is "
                             f"the authority; delete {side.name} or restore it from the graph")
    return embedded


def embedded_manifest(onnx_path: str | os.PathLike) -> dict | None:
    """The manifest stored in the graph's metadata, or None; an unreadable file is an InputError."""
    return _embedded(_load(Path(onnx_path)), onnx_path)


def _embedded(proto, onnx_path) -> dict | None:
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                m = json.loads(prop.value)
            except ValueError as e:
                raise InputError(f"{onnx_path}: the manifest inside the graph is not valid JSON ({e})") from None
            if not isinstance(m, dict):
                raise InputError(f"{onnx_path}: the manifest inside the graph is not a JSON object")
            return m
    return None


def _flat_difference(proto, manifest: dict) -> str | None:
    """The first field where the graph's flat metadata entries disagree with the manifest (an
    entry that is absent is not compared; one present with a manifest lacking the field is a
    difference)."""
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        want = flat_metadata(manifest)
    except (KeyError, TypeError):
        want = {}
    for key in ("itae.preprocessing", "itae.model", "itae.theta", "itae.enabled"):
        if key not in meta:
            continue
        if key not in want:
            return key
        if key == "itae.preprocessing":
            try:
                graph_prep = json.loads(meta[key])
            except ValueError:
                return key
            d = first_difference(graph_prep, manifest["preprocessing"], "preprocessing.")
            if d is not None:
                return d
        elif meta[key] != want[key]:
            return key
    return None


def first_difference(a, b, prefix: str = "") -> str | None:
    """The dotted name of the first field where two JSON values differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return prefix + str(k)
            d = first_difference(a[k], b[k], f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{prefix}{i}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".") or "(the whole manifest)"
