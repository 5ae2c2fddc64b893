"""The effect of ITAE, side by side: the same images clustered on the unpatched CLS embedding
(the graph's optional ``embedding_unpatched`` output, computed in the same pass) and on the
patched one, scored against the same labels, with the images whose cluster changed."""

from __future__ import annotations

from typing import Callable

import numpy as np

from itae_export.cluster.metrics import clustering_scores, contingency, l2_normalize
from itae_export.errors import InputError
from itae_export.onnx.contract import OUTPUT_EMBEDDING_UNPATCHED

MAX_CHANGED_LISTED = 200  # images listed in summary.json (the count is always whole)


def embed_outputs(compare_baseline: bool) -> dict:
    """The embed stage's keyword for the graph outputs this comparison needs (``EmbedResult.extra``)."""
    return {"extra_outputs": (OUTPUT_EMBEDDING_UNPATCHED,)} if compare_baseline else {}


def require_unpatched_output(manifest: dict, onnx_path) -> None:
    """--compare-baseline needs a graph with the ``embedding_unpatched`` output: one line otherwise."""
    names = [o.get("name") for o in manifest.get("outputs", [])]
    if OUTPUT_EMBEDDING_UNPATCHED not in names:
        raise InputError(f"--compare-baseline: {onnx_path} has no {OUTPUT_EMBEDDING_UNPATCHED} output; export it "
                         f"with itae-export --unpatched-output, or pass --model NAME (exported with it)")


def match_clusters(reference, other) -> np.ndarray:
    """``other``'s cluster ids renamed to the ``reference`` clusters they overlap most (Hungarian);
    a cluster left without a partner gets a new id."""
    from scipy.optimize import linear_sum_assignment

    reference, other = np.asarray(reference), np.asarray(other)
    ref_ids, other_ids = np.unique(reference), np.unique(other)
    m = contingency(reference, other)  # [other clusters, reference clusters]
    rows, cols = linear_sum_assignment(-m)
    rename = {int(other_ids[r]): int(ref_ids[c]) for r, c in zip(rows, cols)}
    new_id = int(max(ref_ids.max(), other_ids.max())) + 1
    for o in other_ids:
        if int(o) not in rename:
            rename[int(o)], new_id = new_id, new_id + 1
    return np.array([rename[int(o)] for o in other], dtype=np.int64)


def baseline_block(res, manifest: dict, onnx_path, patched_labels: np.ndarray, k: int, cluster: Callable, *,
                   y=None, seed: int = 0) -> dict:
    """The comparison for an itae-cluster run: the unpatched embeddings from the embed stage's extra
    outputs (``EmbedResult.extra``), clustered and scored by :func:`compare_with_baseline`."""
    require_unpatched_output(manifest, onnx_path)
    extra = getattr(res, "extra", None) or {}
    if OUTPUT_EMBEDDING_UNPATCHED not in extra:
        raise InputError(f"--compare-baseline: the embed stage returned no {OUTPUT_EMBEDDING_UNPATCHED} "
                         f"(outputs kept: {', '.join(extra) or 'none'})")
    return compare_with_baseline(res.paths, res.embeddings, extra[OUTPUT_EMBEDDING_UNPATCHED], patched_labels, k,
                                 cluster, y=y, seed=seed)


def compare_with_baseline(paths: list[str], patched: np.ndarray, unpatched: np.ndarray, patched_labels: np.ndarray,
                          k: int, cluster: Callable, *, y=None, seed: int = 0) -> dict:
    """summary.json's ``baseline`` block: K-Means (``cluster(embeddings, k, seed=...)``, the job's own)
    on the unpatched embeddings, the scores of both against ``y`` when given, the images whose
    cluster changed (baseline ids matched to the ITAE clusters), and how far the embeddings moved."""
    unpatched = np.asarray(unpatched, np.float32)
    if unpatched.shape != np.asarray(patched).shape:
        raise InputError(f"--compare-baseline: {OUTPUT_EMBEDDING_UNPATCHED} has shape {unpatched.shape}, "
                         f"the embeddings {np.asarray(patched).shape}")
    base_labels = match_clusters(patched_labels, cluster(unpatched, k, seed=seed)[0])
    changed = np.flatnonzero(base_labels != patched_labels)
    cos = (l2_normalize(patched) * l2_normalize(unpatched)).sum(1)
    record = {
        "embedding": OUTPUT_EMBEDDING_UNPATCHED,
        "cosine_itae_vs_baseline": {"mean": float(cos.mean()), "min": float(cos.min()),
                                    "images_moved": int((cos < 1 - 1e-6).sum())},
        "n_changed": int(len(changed)),
        "share_changed": float(len(changed)) / max(len(paths), 1),
        "changed": [{"path": paths[i], "itae": int(patched_labels[i]), "baseline": int(base_labels[i]),
                     **({"label": y[i]} if y is not None else {})} for i in changed[:MAX_CHANGED_LISTED]],
        "baseline_cluster_sizes": np.bincount(base_labels, minlength=k).tolist(),
    }
    if y is not None:
        itae, base = clustering_scores(y, patched_labels), clustering_scores(y, base_labels)
        record["metrics"] = {"itae": itae, "baseline": base, "delta": {m: itae[m] - base[m] for m in itae}}
    return record


def format_baseline(record: dict) -> list[str]:
    """The CLI's lines: the scores side by side and the images that changed cluster."""
    lines = []
    if "metrics" in record:
        m = record["metrics"]
        lines.append("ITAE vs baseline (unpatched): " + "  ".join(
            f"{key.upper()} {m['itae'][key]:.4f} vs {m['baseline'][key]:.4f} ({m['delta'][key]:+.4f})"
            for key in ("acc", "nmi", "ari")))
    c = record["cosine_itae_vs_baseline"]
    lines.append(f"{record['n_changed']} images changed cluster ({100 * record['share_changed']:.1f}%); "
                 f"cosine of ITAE and baseline embeddings: mean {c['mean']:.4f}, min {c['min']:.4f}")
    return lines
