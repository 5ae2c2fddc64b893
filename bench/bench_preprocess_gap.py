"""How far the in-graph preprocessing variant is from the Pillow path of itae-cluster, on real photos.

For each image: the Pillow path (``itae_export.images.load_image`` -> the plain graph, what
itae-cluster does) against the in-graph variant fed the decoded uint8 RGB image (the same
decoder). Prints the cosine of the two embeddings, the artifact-mask tokens that differ, and the
8-bit values of the resized image that differ, per model. Exports the in-graph variant first
(validated against PyTorch; ``--weights`` is the checkpoint the encoder came from).

  python bench/bench_preprocess_gap.py --onnx A.onnx [--onnx B.onnx] --weights W --textiles 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info
from imagefolders import textile_root

from itae_export.images import (
    PreprocessSpec,
    decode_image,
    pil_resize,
    preprocess,
    scan_images,
)
from itae_export.onnx.manifest import read_manifest
from itae_export.onnx.preprocess_graph import (
    export_in_graph,
    in_graph_path,
    reference_resize,
)
from itae_export.runtime import ort_session as onnx_session


def images(n_textiles: int) -> list[tuple[str, object]]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    out = [(f"sklearn:{Path(f).name}", Image.fromarray(a)) for f, a in zip(data.filenames, data.images)]
    root = textile_root()
    if root is not None and n_textiles:
        paths = scan_images(root)
        step = max(1, len(paths) // n_textiles)
        for p in paths[::step][:n_textiles]:
            out.append((p.relative_to(root).as_posix(), decode_image(p)[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", action="append", required=True, help="plain exported encoders")
    ap.add_argument("--weights", help="the checkpoint they were exported from (for the validation)")
    ap.add_argument("--textiles", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    pics = images(args.textiles)
    results = {"machine": machine_info(), "images": len(pics), "models": {}}
    for path in map(Path, args.onnx):
        manifest = read_manifest(path)
        pre = PreprocessSpec.from_manifest(manifest["preprocessing"])
        img_path = in_graph_path(path)
        t0 = time.perf_counter()
        if not img_path.is_file():
            export_in_graph(path, weights=args.weights, log=print)
        validation = read_manifest(img_path)["validation"]
        plain, ingraph = onnx_session(path), onnx_session(img_path)
        cos, flips, flipped_images, artifacts, values_diff, values = [], 0, 0, 0, 0, 0
        for name, im in pics:
            a = np.asarray(im)
            e1, m1 = plain.run(None, {"pixel_values": preprocess(im, pre)[None]})
            e2, m2 = ingraph.run(None, {"image": a[None]})
            cos.append(float((e1 @ e2.T).item() / (np.linalg.norm(e1) * np.linalg.norm(e2))))
            f = int((m1 != m2).sum())
            flips += f
            flipped_images += f > 0
            artifacts += int(m1.sum())
            d = reference_resize(a, pre.height, pre.width) != np.asarray(pil_resize(im, pre))
            values_diff += int(d.sum())
            values += d.size
        cos = np.asarray(cos)
        r = {"theta": manifest["itae"]["theta"], "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
             "cosine_p01": float(np.quantile(cos, 0.01)), "mask_flips": flips, "mask_tokens": len(pics) * m1.shape[1],
             "images_with_flips": flipped_images, "artifacts_pil_path": artifacts,
             "resized_values_differing": values_diff, "resized_values": values,
             "validation": {k: validation[k] for k in ("rel_max_abs_diff", "mask_mismatch", "pixel_mismatch",
                                                       "n_inputs", "passed", "pil_gap")},
             "seconds": round(time.perf_counter() - t0, 1)}
        results["models"][path.name] = r
        print(json.dumps({path.name: r}, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
