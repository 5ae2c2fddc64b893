"""Static int8 (QDQ) on real images: the layer plan, its speed against fp32 and dynamic int8, and the guard.

One run:

1. **Plan** (:func:`itae_export.onnx.optimize.plan_static_int8`, what ``--quantize int8-static``
   does at export): calibration on Fashion-MNIST *train* images, the per-layer sensitivity pass,
   and the fewest layers kept float32 for the clusters to agree on other train images.
   ``--plan FILE`` reuses a plan written by an earlier run (``--save-plan``).
2. **Speed:** the ``--optimize`` float32 graph, dynamic int8 (``--quantize int8``), static int8
   of every weight MatMul, and the planned static graph, interleaved turns at ``--batch``.
3. **Guard** (:func:`itae_export.onnx.optimize.validate_int8`) of the planned graph (and with
   ``--guard-all`` of the all-int8 static graph) on the Fashion-MNIST test images and on the
   textile images.

    .venv/bin/python bench/bench_int8_static.py --save-plan exported/bench/plan_vits14.json
    .venv/bin/python bench/bench_int8_static.py --plan exported/bench/plan_vits14.json --repeats 7
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import build_from_args, cached_export, log, ort_session  # noqa: E402
from bench_int8 import textile_dir  # noqa: E402
from common import add_model_args, format_table, interleaved, median, print_machine, spread  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--plan", type=Path, default=None, help="a plan JSON from --save-plan (skips the planning)")
    ap.add_argument("--save-plan", type=Path, default=None)
    ap.add_argument("--images", type=int, default=256, help="real images per guard check")
    ap.add_argument("--no-guard", action="store_true", help="speed only")
    ap.add_argument("--guard-all", action="store_true", help="also the guard of the all-int8 static graph")
    ap.add_argument("--cache", type=Path, default=Path("exported") / "bench")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    info = print_machine(args.threads)

    from itae_export.onnx.optimize import (
        calibration_images,
        plan_static_int8,
        quantize_int8,
        quantize_static_int8,
        validate_int8,
    )


    spec, options, model, what, tag = build_from_args(args)
    fp32, manifest = cached_export(spec, options, model, args.cache, tag, "opt_itae", log, optimize=True)
    work = Path(tempfile.mkdtemp(prefix="itae-int8s-"))
    if args.plan:
        plan = json.loads(args.plan.read_text())
        cal = None
    else:
        cal, cal_what = calibration_images(None, manifest, 64, part=0)
        sel, sel_what = calibration_images(None, manifest, 120, part=1)
        log(f"planning: calibration {cal_what}; selection {sel_what}")
        plan = plan_static_int8(fp32, work, cal, sel, 10, log=log)
        plan.update(calibration=cal_what, selection=sel_what)
        if args.save_plan:
            Path(plan["cache"]).replace(args.save_plan.with_suffix(".calibration.json"))
            plan["cache"] = str(args.save_plan.with_suffix(".calibration.json"))
            args.save_plan.write_text(json.dumps(plan, indent=1) + "\n")
    paths = {"fp32 --optimize": fp32, "dynamic int8": work / "dyn.onnx", "static int8, all": work / "all.onnx",
             f"static int8, {len(plan['keep_fp32'])} fp32": work / "planned.onnx"}
    quantize_int8(fp32, paths["dynamic int8"])
    quantize_static_int8(fp32, paths["static int8, all"], cal, cache=plan["cache"])
    q = quantize_static_int8(fp32, work / "planned.onnx", None, cache=plan["cache"], keep_fp32=plan["keep_fp32"])

    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
    sessions = {v: ort_session(p, args.threads, False) for v, p in paths.items()}
    log(f"timing batch {args.batch}: {args.repeats} turns of {len(sessions)} graphs ...")
    t = interleaved({v: (lambda s=s: s.run(["embedding"], {"pixel_values": x})) for v, s in sessions.items()},
                    repeats=args.repeats)
    ref = median(t["fp32 --optimize"])
    rows = [{"graph": v, "images_s": args.batch / median(t[v]), "x_fp32": ref / median(t[v]), "spread": spread(t[v])}
            for v in paths]

    print(f"\n{spec.name} ({what} weights), batch {args.batch}, {args.threads} threads, spinning off, {args.repeats} "
          f"interleaved turns, medians; load average at start {info['load_avg']}")
    print("\n1. Plan: each layer int8 alone, end to end (1 - mean cosine to fp32, mask entries flipped), most "
          "damaging first:")
    print(", ".join(f"{r['layer']} {r['damage']:.1e}/{r['mask_flips']:.2%}" for r in plan["sensitivity"]))
    print("trials (n most damaging layers float32; selection images, ARI needs >= "
          f"{plan['min_ari_selection']:.2f}):")
    print(format_table(plan["trials"], [("fp32_layers", "fp32 layers"), ("kmeans_ari", "ARI"),
                                        ("min_cosine", "cos min"), ("mask_agreement", "mask agree"), ("passed", "ok")]))
    print(f"kept float32: {', '.join(q['kept_fp32_layers'])} ({q['quantized']} of {q['weight_matmuls']} weight MatMuls int8)")
    print("\n2. Speed:")
    print(format_table(rows, [("graph", "graph"), ("images_s", "images/s"), ("x_fp32", "x fp32"), ("spread", "noise")]),
          flush=True)

    if args.no_guard:
        return
    sets = {"Fashion-MNIST test": None}
    if textile_dir():
        sets["textiles"] = textile_dir()
    print("\n3. Guard (K-Means ARI >= 0.95 against fp32, warm-started):")
    for set_name, d in sets.items():
        for v in list(paths)[2 if args.guard_all else 3:]:
            log(f"guard: {v} on {set_name} ...")
            r = validate_int8(fp32, paths[v], manifest, images_dir=d, n_images=args.images)
            print(f"{set_name} ({r['real_images']}, k={r['k']}), {v}: cos min {r['min_cosine']:.4f} mean "
                  f"{r['mean_cosine']:.5f}, mask agree {r['mask_agreement']:.2%}, ARI {r['kmeans_ari']:.4f}, "
                  f"independent-runs ARI {r['kmeans_ari_independent_runs']:.4f}: "
                  f"{'passes' if r['passed'] else 'FAILS'}", flush=True)


if __name__ == "__main__":
    main()
