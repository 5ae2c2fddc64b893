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
    ap.add_argument("--alpha", type=float, default=None,
                    help="SmoothQuant alpha before planning [optimize.SMOOTH_ALPHA, as --quantize int8-static]; 0: none")
    ap.add_argument("--end-to-end", type=int, default=0, metavar="N",
                    help="also itae-cluster on N textile images, planned static graph against fp32 (bench_cluster.py)")
    ap.add_argument("--theta", type=float, default=None, help="ITAE theta of the export [the model's default]")
    ap.add_argument("--no-itae", action="store_true", help="the unpatched graph (what --theta auto gives on unimodal norms)")
    ap.add_argument("--cache", type=Path, default=Path("exported") / "bench")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    info = print_machine(args.threads)

    from itae_export.onnx.optimize import (
        SMOOTH_ALPHA,
        SMOOTH_LAYERS,
        calibration_images,
        plan_static_int8,
        quantize_int8,
        quantize_static_int8,
        smooth_activations,
        validate_int8,
    )
    from itae_export.runtime import run_onnx

    import dataclasses

    spec, options, model, what, tag = build_from_args(args)
    variant = "opt_itae"
    if args.no_itae:
        options, variant = dataclasses.replace(options, enabled=False), "opt_noitae"
    elif args.theta is not None:
        options, variant = dataclasses.replace(options, theta=args.theta), f"opt_theta{args.theta:g}"
    fp32, manifest = cached_export(spec, options, model, args.cache, tag, variant, log, optimize=True)
    work = Path(tempfile.mkdtemp(prefix="itae-int8s-"))
    alpha = SMOOTH_ALPHA if args.alpha is None else args.alpha
    cal, cal_what = calibration_images(None, manifest, 64, part=0)
    base = fp32  # the graph that is quantized: fp32, SmoothQuant-migrated as --quantize int8-static does
    if alpha > 0:
        base = work / "smoothed.onnx"
        log(f"SmoothQuant alpha {alpha} of {', '.join(SMOOTH_LAYERS)} on {cal_what} ...")
        smoothing = smooth_activations(fp32, base, cal, alpha=alpha)
        log(f"  {len(smoothing)} layers smoothed")
    if args.plan:
        plan = json.loads(args.plan.read_text())
        plan["cache"] = str(work / "calibration.json")
    else:
        sel, sel_what = calibration_images(None, manifest, 120, part=1)
        log(f"planning: calibration {cal_what}; selection {sel_what}")
        plan = plan_static_int8(base, work, cal, sel, 10, log=log)
        plan.update(calibration=cal_what, selection=sel_what)
        if args.save_plan:
            Path(plan["cache"]).replace(args.save_plan.with_suffix(".calibration.json"))
            plan["cache"] = str(args.save_plan.with_suffix(".calibration.json"))
            args.save_plan.write_text(json.dumps(plan, indent=1) + "\n")
    paths = {"fp32 --optimize": fp32, "dynamic int8": work / "dyn.onnx", "static int8, all": work / "all.onnx",
             f"static int8, {len(plan['keep_fp32'])} fp32": work / "planned.onnx"}
    quantize_int8(fp32, paths["dynamic int8"])
    quantize_static_int8(base, paths["static int8, all"], cal, cache=plan["cache"])
    q = quantize_static_int8(base, work / "planned.onnx", None, cache=plan["cache"], keep_fp32=plan["keep_fp32"])

    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
    sessions = {v: ort_session(p, args.threads, False) for v, p in paths.items()}
    log(f"timing batch {args.batch}: {args.repeats} turns of {len(sessions)} graphs ...")
    t = interleaved({v: (lambda s=s: s.run(["embedding"], {"pixel_values": x})) for v, s in sessions.items()},
                    repeats=args.repeats)
    ref = median(t["fp32 --optimize"])
    rows = [{"graph": v, "images_s": args.batch / median(t[v]), "x_fp32": ref / median(t[v]), "spread": spread(t[v])}
            for v in paths]

    share = run_onnx(fp32, cal, batch_size=8)["artifact_mask"].mean()
    itae = (f"ITAE at theta {manifest['itae']['theta']:g} (flags {share:.1%} of the tokens of the calibration "
            "images)") if manifest["itae"]["enabled"] else "--no-itae"
    print(f"\n{spec.name} ({what} weights), {itae}, batch {args.batch}, {args.threads} threads, spinning off, {args.repeats} "
          f"interleaved turns, medians; load average at start {info['load_avg']}; static graphs "
          + (f"SmoothQuant alpha {alpha} ({', '.join(SMOOTH_LAYERS)})" if alpha > 0 else "not smoothed"))
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

    if args.end_to_end:
        end_to_end(fp32, work / "planned.onnx", manifest, q, args)
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
                  f"independent-runs ARI {r['kmeans_ari_independent_runs']:.4f}, 10-NN kept "
                  f"{r['neighbour_overlap']:.1%}, centroid kept {r['centroid_kept']:.1%}: "
                  f"{'passes' if r['passed'] else 'FAILS'}", flush=True)


def end_to_end(fp32: Path, planned: Path, manifest: dict, q: dict, args) -> None:
    """itae-cluster on the textile images with the planned static graph against the fp32 graph
    (``bench_cluster.py --against``, jobs in turns). The int8 graph gets the fp32 manifest with
    its quantization recorded and is sealed, so that itae-cluster opens it; it is a bench file
    (the guard of step 3 decides whether ``itae-export`` would publish it)."""
    import copy
    import subprocess

    import onnx

    from itae_export.onnx.manifest import seal, write_manifest

    m = copy.deepcopy(manifest)
    m["quantization"] = {"type": "int8-static", **{k: q[k] for k in ("method", "quantized", "weight_matmuls")},
                         "validation": {"passed": None, "note": "bench_int8_static.py: speed only, see its guard"}}
    proto = onnx.load(str(planned))
    seal(proto, m)
    onnx.save_model(proto, str(planned))
    write_manifest(planned, m)
    print(f"\n4. End to end (itae-cluster, {args.end_to_end} textile images; A = fp32 --optimize, B = planned static):",
          flush=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_cluster.py")), "--onnx", str(fp32), "--against",
                    str(planned), "--n", str(args.end_to_end), "--turns", "3", "--threads", str(args.threads)], check=True)


if __name__ == "__main__":
    main()
