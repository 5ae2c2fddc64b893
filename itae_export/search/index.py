"""The search index over the embeddings of a collection (an itae-cluster or itae-embed cluster output
folder, or an itae-embed shard directory): exact inner product for small
collections, a faiss IVF index above :data:`APPROX_MIN_VECTORS`, persisted beside the embeddings.

Vectors are L2-normalised, so the inner product is the cosine similarity. An index belongs to
one model: its ``model_id`` (the fingerprint of the exported graph, from summary.json) travels
with it, and every query names the model it was embedded with (:meth:`SearchIndex.check_model`).

Files, in ``<cluster output>/search/``: ``index.json`` (written last; marks a complete index) and,
for the approximate kind, ``index.faiss``. Both are written atomically.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itae_export.cluster.metrics import l2_normalize
from itae_export.data.outputs import SUMMARY, read_outputs
from itae_export.data.shards import MANIFEST as SHARD_MANIFEST
from itae_export.data.shards import open_shards
from itae_export.errors import InputError
from itae_export.files import atomic_write_bytes, atomic_write_json

INDEX_SCHEMA = 1
INDEX_DIR = "search"
KINDS = ("auto", "exact", "ivf")
# Below this many vectors the exact search answers a query in a few ms on one core (see
# docs/search.md, "Exact or approximate"), and an approximate index only costs recall.
APPROX_MIN_VECTORS = 200_000
TARGET_RECALL = 0.97  # recall@10 the IVF nprobe is tuned for at build time, on the collection itself


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a JSON {type(data).__name__}, not an object ({what})")
    return data


# the summary fields a collection's reader uses, and the kinds they must be: a forged summary.json
# is one line naming the field, never a TypeError deep in the index or the session
SUMMARY_TEXTS = {"model_id": True, "model": False, "folder": False, "onnx": False, "shards": False}


def _check_collection(where: Path, summary: dict, paths: list[str], emb: np.ndarray) -> None:
    """What every reader of a collection relies on, checked once here: the summary's fields are texts,
    the vectors are a finite [n, D] float array with D >= 1, and no path is listed twice."""
    for name, required in SUMMARY_TEXTS.items():
        v = summary.get(name)
        if (v is None and required) or (v is not None and not (isinstance(v, str) and v)):
            raise InputError(f"{where / SUMMARY}: {name!r} must be a non-empty text, not {v!r:.60}"
                             + ("; run itae-cluster again to write one" if v is None else ""))
    if emb.ndim != 2 or emb.shape[1] < 1:
        raise InputError(f"{where}: embeddings.npy has shape {list(emb.shape)}, not [n, D] with D >= 1")
    for start in range(0, len(emb), 65536):  # a memory map: read in blocks, once
        bad = ~np.isfinite(np.asarray(emb[start:start + 65536])).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise InputError(f"{where}: the vector of {paths[row]!r:.120} (row {row + 1}) is not finite "
                             "(NaN or inf); itae-cluster never writes one: run it again")
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise InputError(f"{where}: {p!r:.120} is listed twice; a collection lists each image once")
        seen.add(p)


def read_collection(out_dir: str | os.PathLike) -> tuple[dict, list[str], np.ndarray]:
    """(summary, keys, raw embeddings [n, D]) of a collection: an itae-cluster output folder, an
    ``itae-embed cluster`` output folder (its vectors are those of the shard directory it names), or
    a shard directory written by ``itae-embed run``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: no such folder (expected an itae-cluster or itae-embed output folder)")
    if not (out_dir / SUMMARY).is_file() and (out_dir / SHARD_MANIFEST).is_file():
        return _shard_collection(out_dir)
    if (out_dir / SUMMARY).is_file():
        summary = _read_json(out_dir / SUMMARY, "the summary of the run")
        if summary.get("shards") and not (out_dir / "embeddings.npy").is_file():  # itae-embed cluster
            _check_collection(out_dir, summary, [], np.zeros((0, 1), np.float32))  # its fields, before the path
            return _shard_collection(Path(summary["shards"]))
    data = read_outputs(out_dir)  # one set, checked; names as on disk
    summary, paths, emb = data["summary"], [row["path"] for row in data["rows"]], data["embeddings"]
    _check_collection(out_dir, summary, paths, emb)
    return summary, paths, emb


def _shard_collection(shard_dir: Path) -> tuple[dict, list[str], np.ndarray]:
    """A shard directory as a collection: the keys and vectors of its parts, the model of its manifest."""
    shards = open_shards(shard_dir)
    model, source = shards.manifest.get("model") or {}, shards.manifest.get("input") or {}
    location = Path(source.get("location") or shard_dir)
    root = location if source.get("kind") == "folder" else location.parent
    summary = {"model_id": model.get("id"), "model": model.get("name"), "onnx": model.get("onnx"),
               "folder": str(root), "shards": str(Path(shard_dir).resolve())}
    keys, vectors = shards.keys(), shards.load_all()
    _check_collection(Path(shard_dir), summary, keys, vectors)
    return summary, keys, vectors


def _collection_stamp(out_dir: Path, summary: dict) -> list:
    """What changes when the collection's vectors change: embeddings.npy's (size, mtime), or each part file's."""
    if summary.get("shards") and not (out_dir / "embeddings.npy").is_file():
        parts = sorted(Path(summary["shards"]).glob("part-*.parquet"))
        return [x for f in parts for x in _stamp(f)]
    return _stamp(out_dir / "embeddings.npy")


@dataclass
class SearchIndex:
    """Unit vectors of one collection and a way to find the top-k by inner product."""

    root: Path  # the image folder the relative paths are in
    paths: list[str]
    vectors: np.ndarray  # [n, D] float32, unit norm
    model_id: str
    model: str | None = None
    weights_sha256: str | None = None  # of the checkpoint the image graph came from (text queries)
    kind: str = "exact"
    faiss_index: object = None
    nprobe: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.paths)

    def check_model(self, model_id: str, what: str = "the query") -> None:
        """A query never meets vectors of another model."""
        if model_id != self.model_id:
            raise InputError(f"{what} was embedded with model {model_id[:19]}…, but the index holds vectors of "
                             f"model {self.model_id[:19]}…; use the model the collection was embedded with")

    def search(self, queries: np.ndarray, k: int, *, exclude: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids [q, k], scores [q, k]) of the k best rows by inner product, best first.

        ``exclude``: row ids never returned (the images already judged). Where fewer rows than
        k remain, ids are -1 and scores -inf."""
        q = np.atleast_2d(np.asarray(queries, np.float32))
        if q.shape[1] != self.dim:
            raise InputError(f"query dimension {q.shape[1]} differs from the index's {self.dim}")
        exclude = exclude or set()
        want = min(len(self), k + len(exclude))
        if self.kind == "exact" or self.faiss_index is None:
            ids, scores = exact_topk(self.vectors, q, want)
        else:
            self.faiss_index.nprobe = self.nprobe
            scores, ids = self.faiss_index.search(np.ascontiguousarray(q), want)
        return _drop_excluded(ids, scores, exclude, k)

    def row(self, path: str) -> int:
        try:
            return self._rows[path]
        except AttributeError:
            self._rows = {p: i for i, p in enumerate(self.paths)}
            return self.row(path)
        except KeyError:
            raise InputError(f"{path}: not an image of this index ({self.root})") from None


def exact_topk(vectors: np.ndarray, q: np.ndarray, k: int, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, scanning ``vectors`` in blocks (memory stays bounded)."""
    n = len(vectors)
    k = min(k, n)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, n, block):
        s = q @ vectors[start:start + block].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1)


def _drop_excluded(ids, scores, exclude: set[int], k: int):
    out_i = np.full((len(ids), k), -1, np.int64)
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    for r in range(len(ids)):
        keep = [(i, s) for i, s in zip(ids[r], scores[r]) if i >= 0 and int(i) not in exclude][:k]
        if keep:
            out_i[r, :len(keep)] = [i for i, _ in keep]
            out_s[r, :len(keep)] = [s for _, s in keep]
    return out_i, out_s


# ---------------------------------------------------------------- building and persisting


def choose_kind(n: int, kind: str = "auto") -> str:
    if kind not in KINDS:
        raise InputError(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "auto":
        return "ivf" if n >= APPROX_MIN_VECTORS else "exact"
    return kind


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("the approximate index needs faiss: pip install -e '.[search]' in the itae-export clone (faiss-cpu)") from None
    return faiss


def build_ivf(vectors: np.ndarray, *, nlist: int | None = None, seed: int = 0, target_recall: float = TARGET_RECALL,
              probe_queries: int = 200, log=None):
    """(faiss IndexIVFFlat with inner product, nprobe, build info).

    nlist = 2 sqrt(n) (rounded to a power of two); k-means (10 iterations) trained on at most 50 nlist
    points.
    nprobe is the smallest power of two whose recall@10 against exact search, on ``probe_queries``
    rows of the collection itself, reaches ``target_recall``."""
    faiss = _import_faiss()
    n, d = vectors.shape
    nlist = nlist or max(16, 2 ** round(math.log2(2 * math.sqrt(n))))
    nlist = min(nlist, max(1, n // 39))  # faiss wants >= 39 training points per centroid
    rng = np.random.default_rng(seed)
    train = vectors[np.sort(rng.choice(n, min(n, 50 * nlist), replace=False))]
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.niter = 10
    index.train(np.ascontiguousarray(train, np.float32))
    for start in range(0, n, 262144):
        index.add(np.ascontiguousarray(vectors[start:start + 262144], np.float32))
    probe = np.ascontiguousarray(vectors[rng.choice(n, min(n, probe_queries), replace=False)], np.float32)
    truth, _ = exact_topk(vectors, probe, 10)
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        _, got = index.search(probe, 10)
        recall = recall_at_k(got, truth)
        if log:
            log(f"  nprobe {nprobe}: recall@10 {recall:.3f}")
        if recall >= target_recall or nprobe >= nlist:
            break
        nprobe *= 2
    return index, min(nprobe, nlist), {"nlist": nlist, "nprobe": min(nprobe, nlist), "build_recall_at_10": recall,
                                       "probe_queries": len(probe)}


def recall_at_k(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` found in the same row of ``got``."""
    return float(np.mean([len(set(g.tolist()) & set(t.tolist())) / len(t) for g, t in zip(got, truth)]))


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _weights_sha(summary: dict) -> str | None:
    """The checkpoint sha256 recorded in the manifest of the graph the collection was embedded with."""
    onnx = summary.get("onnx")
    side = Path(onnx).with_suffix(".json") if onnx else None
    if side is None or not side.is_file():
        return None
    try:
        return (json.loads(side.read_text()).get("weights") or {}).get("sha256")
    except (json.JSONDecodeError, OSError):
        return None


def build_index(out_dir: str | os.PathLike, *, kind: str = "auto", log=None) -> SearchIndex:
    """Build the index of an itae-cluster output folder and persist it in ``out_dir/search/``."""
    out_dir = Path(out_dir)
    summary, paths, raw = read_collection(out_dir)
    vectors = l2_normalize(np.asarray(raw, np.float32)).astype(np.float32)
    kind = choose_kind(len(paths), kind)
    meta = {
        "schema": INDEX_SCHEMA,
        "kind": kind,
        "model_id": summary["model_id"],
        "model": summary.get("model"),
        "weights_sha256": _weights_sha(summary),
        "folder": summary.get("folder"),
        "onnx": summary.get("onnx"),
        "n": len(paths),
        "dim": int(vectors.shape[1]),
        "metric": "inner product of L2-normalised embeddings (cosine)",
        "embeddings": _collection_stamp(out_dir, summary),
    }
    index = SearchIndex(Path(summary.get("folder") or out_dir), paths, vectors, summary["model_id"],
                        summary.get("model"), meta["weights_sha256"], kind)
    if kind == "ivf":
        if log:
            log(f"building an IVF index over {len(paths)} vectors ...")
        faiss = _import_faiss()
        index.faiss_index, index.nprobe, meta["ivf"] = build_ivf(vectors, log=log)
        atomic_write_bytes(out_dir / INDEX_DIR / "index.faiss", faiss.serialize_index(index.faiss_index).tobytes())
    atomic_write_json(out_dir / INDEX_DIR / "index.json", meta)  # last: marks a complete index
    index.info = meta
    return index


def load_index(out_dir: str | os.PathLike, *, kind: str = "auto", rebuild: bool = True, log=None) -> SearchIndex:
    """The persisted index of ``out_dir`` when it is current (same embeddings, same model, same kind
    asked), else a new one built now (or an InputError with ``rebuild=False``)."""
    out_dir = Path(out_dir)
    meta_path = out_dir / INDEX_DIR / "index.json"
    summary, paths, raw = read_collection(out_dir)
    stale = None
    if not meta_path.is_file():
        stale = "no index yet"
    else:
        meta = _read_json(meta_path, "the search index")
        wanted = choose_kind(len(paths), kind) if kind != "auto" else meta.get("kind")
        if meta.get("schema") != INDEX_SCHEMA:
            stale = "older index schema"
        elif meta.get("model_id") != summary["model_id"]:
            stale = "the collection was embedded again with another model"
        elif meta.get("embeddings") != _collection_stamp(out_dir, summary) or meta.get("n") != len(paths):
            stale = "the embeddings changed"
        elif meta.get("kind") != wanted:
            stale = f"a {wanted} index was asked for"
    if stale:
        if not rebuild:
            raise InputError(f"{meta_path}: not usable ({stale}); run itae-search index {out_dir}")
        if log:
            log(f"building the search index ({stale})")
        return build_index(out_dir, kind=kind, log=log)
    vectors = l2_normalize(np.asarray(raw, np.float32)).astype(np.float32)
    index = SearchIndex(Path(summary.get("folder") or out_dir), paths, vectors, meta["model_id"], meta.get("model"),
                        meta.get("weights_sha256"), meta["kind"], info=meta)
    if meta["kind"] == "ivf":
        faiss = _import_faiss()
        data = np.frombuffer((out_dir / INDEX_DIR / "index.faiss").read_bytes(), np.uint8)
        index.faiss_index = faiss.deserialize_index(data)
        index.nprobe = int(meta["ivf"]["nprobe"])
        if index.faiss_index.ntotal != len(paths):
            raise InputError(f"{out_dir / INDEX_DIR / 'index.faiss'}: holds {index.faiss_index.ntotal} vectors, "
                             f"not {len(paths)}; run itae-search index {out_dir} --force")
    return index
