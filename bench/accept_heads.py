"""Issue 24's acceptance for the heads: fit_head with default settings (threads chosen by the
trainer), TSP and TEMI, three seeds each, on scikit-learn digits (PCA to 32 dims, and the raw
64-d pixels), timed together, against K-Means (n_init=10) on the L2-normalised vectors.

    python bench/accept_heads.py                 # both sets
    python bench/accept_heads.py --sets digits-pca32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_machine  # noqa: E402


def load(name: str):
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    x, y = load_digits(return_X_y=True)
    if name == "digits-pca32":
        x = PCA(32, random_state=0).fit_transform(x)
    return x.astype(np.float32), y


def main(argv=None) -> int:
    from sklearn.cluster import KMeans

    from itae_export.cluster.heads import fit_head
    from itae_export.cluster.metrics import cluster_accuracy, l2_normalize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["digits-pca32", "digits"], choices=["digits-pca32", "digits"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    print_machine(None)
    for name in args.sets:
        x, y = load(name)
        km = np.mean([cluster_accuracy(y, KMeans(10, n_init=10, random_state=s).fit_predict(l2_normalize(x)))
                      for s in args.seeds])
        print(f"\n{name}: {x.shape[0]} x {x.shape[1]}; K-Means ACC {100 * km:.1f} % (mean of seeds); "
              f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        total = 0.0
        for method in ("tsp", "temi"):
            accs = []
            for seed in args.seeds:
                t0 = time.perf_counter()
                r = fit_head(x, 10, method, seed=seed, progress=False, log=lambda m: print("  " + m, flush=True))
                dt = time.perf_counter() - t0
                total += dt
                accs.append(cluster_accuracy(y, r.labels_))
                print(f"  {method} seed {seed}: ACC {100 * accs[-1]:.1f} %, {dt:.1f} s "
                      f"(estimate {r.threads['estimate_s'] or 0:.1f} s of training, {r.threads['threads']} threads)",
                      flush=True)
            gain = 100 * (np.mean(accs) - km)
            print(f"  {method}: ACC {100 * np.mean(accs):.1f} ± {100 * np.std(accs):.1f} %, {gain:+.1f} points over "
                  f"K-Means ({'passes' if gain >= 5 else 'FAILS'} the +5 bar)", flush=True)
        print(f"  six fits: {total:.0f} s ({'within' if total <= 300 else 'OVER'} 5 minutes); load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
