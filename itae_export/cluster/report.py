"""report.html: one self-contained page over an itae-cluster output folder.

It opens from disk with no server and no network (no CDN, no web fonts). It shows the run, the
metrics when labels are known, the count of breakaway points (paper A1.5: silhouette < 0 on the
true labels, cosine distance on L2-normalised embeddings), a 2-D map of the embeddings (t-SNE up
to ``tsne_max_points`` points, PCA above; the page says which) and, per cluster, its size and a
grid of thumbnails, nearest to the centroid first, each linking to its file.

Thumbnails are small JPEG files in ``thumbs/`` beside the page (not base64 blobs), at most
``max_thumbs_per_cluster`` per cluster, so the page stays fast with thousands of images.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import numpy as np

from itae_export.cluster.artifacts import report_lines
from itae_export.cluster.metrics import l2_normalize
from itae_export.data.outputs import read_outputs
from itae_export.data.shards import clustered_vectors
from itae_export.errors import InputError, ITAEError
from itae_export.files import atomic_write_bytes
from itae_export.images import to_rgb
from itae_export.onnx.manifest import read_manifest
from itae_export.plots import plot_embedding_map

REPORT_NAME = "report.html"
MAP_NAME = "map.png"
NORMS_NAME = "norms_hist.png"  # the run's own norm histogram, with its theta
FLAGGED_NAME = "flagged_attention.png"  # CLS attention maps of the most-flagged images
THUMBS_DIR = "thumbs"
MAP_METHODS = ("auto", "tsne", "pca")
TSNE_MAX_POINTS = 2000
THUMB_SIZE = 112


def read_cluster_output(out_dir: str | os.PathLike) -> dict:
    """The output set of an itae-cluster run, checked to be one set (:func:`~itae_export.data.outputs.read_outputs`);
    for an ``itae-embed cluster`` output, the embeddings are read from its shard directory."""
    data = read_outputs(out_dir)
    if data["embeddings"] is None:
        data["embeddings"] = clustered_vectors(data["summary"], len(data["rows"]), Path(out_dir) / "summary.json")
    return data


def breakaway_points(embeddings: np.ndarray, labels) -> np.ndarray:
    """A1.5: points whose silhouette on the true labels is below 0 (cosine, L2-normalised embeddings)."""
    from sklearn.metrics import silhouette_samples


    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return np.zeros(len(labels), dtype=bool)
    return silhouette_samples(l2_normalize(embeddings), labels, metric="cosine") < 0


def embedding_map(embeddings: np.ndarray, method: str = "auto", *, tsne_max_points: int = TSNE_MAX_POINTS,
                  seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the L2-normalised embeddings and a sentence saying how they were made."""
    from sklearn.decomposition import PCA


    if method not in MAP_METHODS:
        raise InputError(f"map_method: {method!r} is not one of {', '.join(MAP_METHODS)}")
    x = l2_normalize(embeddings)
    n = len(x)
    if n < 3:
        return np.zeros((n, 2)), "too few points for a map"
    use_tsne = method == "tsne" or (method == "auto" and n <= tsne_max_points)
    if not use_tsne:
        xy = PCA(2, random_state=seed).fit_transform(x)
        why = f" ({n} points > {tsne_max_points}: t-SNE would be slow)" if method == "auto" else ""
        return xy, f"PCA, first two components of the L2-normalised embeddings{why}"
    from sklearn.manifold import TSNE

    pre = PCA(min(50, x.shape[1], n), random_state=seed).fit_transform(x) if x.shape[1] > 50 else x
    perplexity = float(min(30, max(2, (n - 1) / 3)))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(pre)
    return xy, f"t-SNE (perplexity {perplexity:g}) of the L2-normalised embeddings, {n} points"


def _write_atomic_fast(path: Path, data: bytes) -> None:
    """Temporary file and rename, without fsync (thumbnails are cheap to redo; many small files)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _make_thumb(src: Path, dst: Path, size: int) -> bool:
    import io

    from PIL import Image, ImageOps


    try:
        with Image.open(src) as im:
            im.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at a reduced scale
            im = ImageOps.exif_transpose(im)
            im = to_rgb(im)
            scale = size / max(im.size)
            if scale < 1:
                im.thumbnail((size, size), Image.BICUBIC)
            else:  # small images (Fashion-MNIST's 28x28) are enlarged to fill the tile
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=82)
        _write_atomic_fast(dst, buf.getvalue())
        return True
    except Exception:  # noqa: BLE001 - a thumbnail that fails is shown as a text tile
        return False


def _href(target: Path, base: Path) -> str:
    try:
        rel = os.path.relpath(target, base)
        return quote(os.fsencode(Path(rel).as_posix()))  # any name: its bytes, percent-encoded
    except ValueError:  # another drive (Windows)
        return target.as_uri()


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em 2em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.1em;margin:.2em 0}
table.kv td{padding:.1em .8em .1em 0;vertical-align:top} table.kv td:first-child{color:#666}
.metrics td,.metrics th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:right}
section.cluster{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em .8em;margin:.8em 0}
.grid{display:flex;flex-wrap:wrap;gap:4px}
.grid a{display:block;width:THUMBpx;height:THUMBpx;background:#eee;display:flex;align-items:center;justify-content:center;
 overflow:hidden;font-size:10px;color:#a00;text-decoration:none}
.grid img{max-width:THUMBpx;max-height:THUMBpx}
.muted{color:#777;font-size:.9em} .warn{color:#a00;font-weight:600} .toc a{margin-right:.6em} img.map{max-width:100%;border:1px solid #ddd;background:#fff}
"""

# Sets data-* attributes on <body> once every image has loaded or failed: the test reads them
# from the DOM; people can ignore them. No network, no external script.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var t = document.querySelectorAll('img.thumb'), ok = 0;
  for (var i = 0; i < t.length; i++) { if (t[i].complete && t[i].naturalWidth > 0) ok++; }
  var m = document.querySelector('img.map');
  var b = document.body.dataset;
  b.thumbsTotal = t.length; b.thumbsLoaded = ok;
  b.mapLoaded = (m && m.complete && m.naturalWidth > 0) ? 'yes' : 'no';
  b.clustersShown = document.querySelectorAll('section.cluster').length;
  b.checked = 'yes';
});
"""


def _method_name(summary: dict) -> str:
    """K-Means, TSP head or TEMI head: the clustering named by summary.json."""
    return summary.get("clustering", {}).get("name") or "K-Means"


def write_report(out_dir: str | os.PathLike, *, max_thumbs_per_cluster: int = 24, map_method: str = "auto",
                 tsne_max_points: int = TSNE_MAX_POINTS, thumb_size: int = THUMB_SIZE, seed: int = 0,
                 workers: int = 4, pictures: Callable | None = None, norm_images: int = 64) -> Path:
    """Write ``report.html`` (with ``map.png`` and ``thumbs/``) into an itae-cluster output folder.

    ``pictures``: :func:`itae_export.calibrate.inspection.inspect_run` (passed in, so that this module
    loads no torch), for the norm histogram of ``norm_images`` of the run's images and the attention
    maps of its most-flagged images (PyTorch, from the weights the graph names)."""
    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    data = read_cluster_output(out)
    summary, rows, emb = data["summary"], data["rows"], data["embeddings"]
    if max_thumbs_per_cluster < 0:
        raise InputError(f"max_thumbs_per_cluster: {max_thumbs_per_cluster} must be >= 0")
    root = Path(summary.get("folder") or out)
    clusters = np.asarray([int(r["cluster"]) for r in rows], dtype=np.int64)
    dist = np.asarray([float(r["distance"]) for r in rows])
    has_labels = bool(rows) and "label" in rows[0]
    labels = np.asarray([r["label"] for r in rows]) if has_labels else None
    sizes = summary.get("cluster_sizes")
    k = len(sizes) if sizes is not None else int(clusters.max() + 1 if len(clusters) else 0)
    sizes = sizes if sizes is not None else np.bincount(clusters, minlength=k).tolist()

    # the map and the breakaway points
    breakaway = breakaway_points(emb, labels) if has_labels and len(rows) > 2 else None
    map_note = ""
    if len(rows) >= 3:
        xy, map_note = embedding_map(emb, map_method, tsne_max_points=tsne_max_points, seed=seed)
        plot_embedding_map(xy, clusters, out / MAP_NAME, labels=labels, breakaway=breakaway)
    thumbs = _thumbnails(out, root, rows, clusters, dist, k, max_thumbs_per_cluster, thumb_size, workers)

    parts = _page_head(summary, data, root, out, k, thumb_size)
    parts += _metrics_html(summary, breakaway, len(rows), map_note)
    parts += _itae_html(summary, out, root, [r["path"] for r in rows], pictures, norm_images)
    parts.append('<p class="toc">' + " ".join(f'<a href="#c{c}">{c} ({sizes[c]})</a>' for c in range(k)) + "</p>")
    for c in range(k):
        parts += _cluster_html(c, sizes[c], rows, root, out, clusters, dist, labels, thumbs)
    parts.append(f'<p class="muted">Written by itae-export in {time.perf_counter() - t0:.1f} s.</p>')
    parts.append(f"<script>{CHECK_SCRIPT}</script></body></html>")
    path = out / REPORT_NAME
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8", errors="replace"))  # undecodable name bytes show as U+FFFD
    return path


@dataclass
class _Thumbs:
    shown: dict  # cluster -> row indices shown, nearest to the centroid first
    made: dict  # row index -> whether its thumbnail could be made
    file_of: dict  # row index -> thumbnail path


def _thumbnails(out: Path, root: Path, rows, clusters, dist, k: int, per_cluster: int, size: int,
                workers: int) -> _Thumbs:
    """The thumbnails of the images nearest to each centroid, made in a thread pool."""
    thumbs_dir = out / THUMBS_DIR
    thumbs_dir.mkdir(exist_ok=True)
    shown: dict[int, list[int]] = {}
    for c in range(k):
        idx = np.flatnonzero(clusters == c)
        shown[c] = idx[np.argsort(dist[idx], kind="stable")][:per_cluster].tolist()
    jobs = []
    for idx in shown.values():
        for i in idx:
            name = hashlib.sha1(os.fsencode(rows[i]["path"])).hexdigest()[:16] + ".jpg"
            jobs.append((i, root / rows[i]["path"], thumbs_dir / name))
    with ThreadPoolExecutor(max(1, workers)) as ex:
        made = dict(zip((j[0] for j in jobs), ex.map(lambda j: _make_thumb(j[1], j[2], size), jobs)))
    return _Thumbs(shown, made, {i: dst for i, _, dst in jobs})


def _page_head(summary: dict, data: dict, root: Path, out: Path, k: int, thumb_size: int) -> list[str]:
    """The page's head and the table of what was clustered, with which model and method."""
    esc = html.escape
    model = summary.get("model")
    model_name = model.get("name") if isinstance(model, dict) else model
    itae = summary.get("itae")
    if isinstance(itae, dict):
        shown_keys = ("enabled", "theta", "source", "group", "strategy", "rows", "lsa")
        itae_txt = ", ".join(f"{a}={itae[a]}" for a in shown_keys if a in itae) or json.dumps(itae)
    else:
        itae_txt = str(itae) if itae else "-"
    counts = summary.get("counts", {})
    n_rows = len(data["rows"])
    kv = [
        ("folder", f'<a href="{esc(_href(root, out))}">{esc(str(root))}</a>'),
        ("model", esc(str(model_name or "-"))),
        ("ITAE", esc(itae_txt)),
        ("images", esc(f"{n_rows} clustered" + (f", {counts.get('skipped', len(data['skipped']))} skipped"
                                                if counts or data["skipped"] else ""))),
        ("clusters", f'<span id="n-clusters">{k}</span> ({esc(_method_name(summary))} on L2-normalised embeddings)'),
    ]
    if data["skipped"]:
        kv[-2] = (kv[-2][0], kv[-2][1] + ' (<a href="skipped.csv">skipped.csv</a>)')
    return [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>itae-cluster report: {esc(root.name)}</title>",
            f"<style>{CSS.replace('THUMB', str(thumb_size))}</style></head><body>",
            f'<h1>Clusters of {esc(root.name)}/</h1><table class="kv">',
            *[f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in kv], "</table>"]


def _metrics_html(summary: dict, breakaway, n_rows: int, map_note: str) -> list[str]:
    esc = html.escape
    parts = []
    metrics = summary.get("metrics")
    if metrics:
        names = [m for m in ("acc", "nmi", "ari", "many_to_one_acc") if m in metrics]
        parts.append('<h2>Metrics against the true labels</h2><table class="metrics"><tr>' +
                     "".join(f"<th>{esc(m.upper().replace('_', ' '))}</th>" for m in names) + "</tr><tr>" +
                     "".join(f"<td>{metrics[m]:.4f}</td>" for m in names) + "</tr></table>")
        pp = summary.get("paper_protocol")
        if isinstance(pp, dict) and all(isinstance(pp.get(m), dict) for m in ("acc", "nmi", "ari")):
            parts.append('<p class="muted">Paper protocol: ' + ", ".join(
                f"{m.upper()} {pp[m]['mean']:.4f} ± {pp[m]['se']:.4f}" for m in ("acc", "nmi", "ari")) + "</p>")
    if breakaway is not None:
        parts.append(f'<p>Breakaway points: <b id="n-breakaway">{int(breakaway.sum())}</b> of {n_rows} '
                     "(silhouette &lt; 0 on the true labels, cosine distance on L2-normalised embeddings; paper A1.5)</p>")
    if map_note:
        parts.append(f'<h2>Map of the embeddings</h2><p class="muted">{esc(map_note)}</p>'
                     f'<img class="map" src="{MAP_NAME}" alt="2-D map of the embeddings">')
    return parts


def _itae_html(summary: dict, out: Path, root: Path, rel_paths: list[str], pictures: Callable | None,
               norm_images: int) -> list[str]:
    """What ITAE did: the artifact counts (and the sanity warning), the run's norm histogram with
    its theta, the most-flagged images' attention maps, and the baseline comparison."""
    esc = html.escape
    a = summary.get("artifacts")
    parts = ['<h2 id="itae">What ITAE did</h2>']
    if a:
        parts += [f'<p class="{"warn" if line.startswith("warning") else "muted"}">{esc(line)}</p>'
                  for line in report_lines(a)]
        if a.get("most_flagged"):
            parts.append('<p class="muted">Most flagged: ' + ", ".join(
                f'{esc(m["path"])} ({m["tokens"]})' for m in a["most_flagged"]) + "</p>")
    if pictures is not None and norm_images > 0 and summary.get("onnx") and rel_paths:
        try:
            manifest = read_manifest(summary["onnx"])
            flagged = [m["path"] for m in (a or {}).get("most_flagged", [])]
            pics = pictures(manifest, summary["onnx"], root, rel_paths, out, flagged=flagged,
                               max_images=norm_images, hist_name=NORMS_NAME, attention_name=FLAGGED_NAME)
        except ITAEError as e:
            parts.append(f'<p class="muted">No norm histogram: {esc(str(e))}</p>')
        else:
            parts.append(f'<p class="muted">Query norms of {pics["images"]} of these images (the histogram of '
                         f'itae-inspect): ITAE treats the minority side of the theta line as artifacts; a theta '
                         f'inside one mode flags ordinary patches (docs/guide.md, "Reading the histogram").</p>'
                         f'<img class="map" id="norms" src="{NORMS_NAME}" alt="norm histogram with theta">')
            if "attention" in pics:
                parts.append('<p class="muted">The most-flagged images: the image, the CLS attention without '
                             'and with ITAE, and the flagged tokens.</p>'
                             f'<img class="map" id="flagged" src="{FLAGGED_NAME}" alt="attention maps">')
    b = summary.get("baseline")
    if b:
        if "metrics" in b:
            m = b["metrics"]
            parts.append('<table class="metrics" id="baseline"><tr><th></th><th>ACC</th><th>NMI</th><th>ARI</th></tr>' +
                         "".join(f"<tr><td>{name}</td>" + "".join(f"<td>{m[key][x]:+.4f}</td>" if key == "delta" else
                                                                  f"<td>{m[key][x]:.4f}</td>" for x in ("acc", "nmi", "ari"))
                                 + "</tr>" for name, key in (("ITAE", "itae"), ("baseline (unpatched)", "baseline"),
                                                             ("difference", "delta"))) + "</table>")
        parts.append(f'<p>{b["n_changed"]} images changed cluster between the baseline and ITAE' +
                     (": " + ", ".join(esc(c["path"]) for c in b["changed"][:20]) if b["changed"] else "") + "</p>")
    return parts


def _cluster_html(c: int, size: int, rows, root: Path, out: Path, clusters, dist, labels, thumbs: _Thumbs) -> list[str]:
    """One cluster's section: its label composition and its thumbnails."""
    esc = html.escape
    idx_all = np.flatnonzero(clusters == c)
    comp = ""
    if labels is not None and idx_all.size:
        vals, cnt = np.unique(labels[idx_all], return_counts=True)
        order = np.argsort(-cnt, kind="stable")[:5]
        comp = " · labels: " + ", ".join(f"{esc(str(vals[o]))} {cnt[o]}" for o in order)
    shown = thumbs.shown[c]
    parts = [f'<section class="cluster" id="c{c}" data-cluster="{c}" data-size="{size}">'
             f'<h2>Cluster {c}: {size} images</h2><p class="muted">nearest to the centroid first'
             f"{'; showing ' + str(len(shown)) if len(shown) < size else ''}{comp}</p>"
             '<div class="grid">']
    for i in shown:
        rel = rows[i]["path"]
        title = esc(f"{rel} (distance {dist[i]:.4f}" + (f", label {labels[i]}" if labels is not None else "") + ")")
        href = esc(_href(root / rel, out))
        if thumbs.made.get(i):
            parts.append(f'<a href="{href}" title="{title}"><img class="thumb" src="{THUMBS_DIR}/'
                         f'{thumbs.file_of[i].name}" alt="{esc(rel)}"></a>')
        else:
            parts.append(f'<a href="{href}" title="{title}">no preview</a>')
    parts.append("</div></section>")
    return parts
