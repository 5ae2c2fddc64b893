"""Issue 24's acceptance for ``itae-cluster --method tsp|temi``: default settings against the
same command with ``OMP_NUM_THREADS=1`` (interleaved runs, wall time of the whole command), and
default TEMI on 300 images; each run must log the head's estimate before training.

The encoder is the tests' tiny random-weight DINOv2 export (56 px): the head, not the encoder,
is what this measures. Images: 100 textile photos of each of the 3 classes of conformal-clip-data.

    python bench/accept_cluster_heads.py                  # tsp (2 pairs of runs) and temi
    python bench/accept_cluster_heads.py --methods tsp --repeats 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import print_machine  # noqa: E402


def run(folder: Path, model: Path, out: Path, method: str, env_extra: dict) -> tuple[float, str]:
    env = {**os.environ, **env_extra}
    cli = Path(sys.executable).with_name("itae-cluster")
    t0 = time.perf_counter()
    res = subprocess.run([str(cli), str(folder), "--onnx", str(model), "--k", "3", "--method", method,
                          "--out", str(out)], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"itae-cluster failed ({res.returncode}): {res.stderr[-2000:]}")
    return dt, res.stderr


def estimate_line(stderr: str, method: str) -> str:
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip().startswith(method.upper() + ":")
             and "optimiser steps" in ln]
    return lines[0] if lines else "(no estimate logged)"


def main(argv=None) -> int:
    import imagefolders

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["tsp", "temi"], choices=["tsp", "temi"])
    ap.add_argument("--repeats", type=int, default=2, help="pairs of (default, OMP_NUM_THREADS=1) runs for tsp")
    ap.add_argument("--per-class", type=int, default=100)
    args = ap.parse_args(argv)
    print_machine(None)
    base = Path(tempfile.mkdtemp(prefix="itae-accept-heads-"))
    folder = base / "photos"
    n = len(imagefolders.textile_folder(folder, per_class=args.per_class))
    model = imagefolders.tiny_onnx(base / "models", resolution=56)
    print(f"{n} images, tiny DINOv2 export (56 px), k = 3", flush=True)
    i = 0
    for method in args.methods:
        times: dict[str, list[float]] = {"default": [], "OMP_NUM_THREADS=1": []}
        for r in range(args.repeats if method == "tsp" else 1):
            for label, env in (("default", {}), ("OMP_NUM_THREADS=1", {"OMP_NUM_THREADS": "1"})):
                if method == "temi" and label != "default":
                    continue
                i += 1
                dt, err = run(folder, model, base / f"out{i}", method, env)
                times[label].append(dt)
                print(f"--method {method} [{label}] run {r + 1}: {dt:.1f} s; load average "
                      f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}\n  {estimate_line(err, method)}", flush=True)
        if times["OMP_NUM_THREADS=1"]:
            d, one = min(times["default"]), min(times["OMP_NUM_THREADS=1"])
            print(f"--method {method}: default {d:.1f} s, OMP_NUM_THREADS=1 {one:.1f} s (best of {args.repeats}): "
                  f"ratio {d / one:.2f} ({'within' if d <= 1.5 * one else 'OVER'} 1.5x)", flush=True)
        else:
            d = times["default"][0]
            print(f"--method {method}: {d:.1f} s on {n} images ({'within' if d <= 300 else 'OVER'} 300 s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
