// The preprocessing of docs/onnx-contract.md (steps 5 and 6) in plain JavaScript, written from
// the docs alone: squash resize with Pillow's BICUBIC (width pass, then height pass, 22-bit
// fixed-point weights, uint8 rounding after each pass) and the float32 normalisation.
// Works in browsers and in Node.js; no dependencies. tests/test_js_port.py checks it against the
// golden files bit for bit.

const cubic = (t, a = -0.5) => {
  t = Math.abs(t);
  if (t < 1) return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1;
  if (t < 2) return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a;
  return 0;
};
const linear = (t) => Math.max(0, 1 - Math.abs(t));

// One pass from nIn to nOut samples: [{lo, q: Int32Array}] per output index.
export function passWeights(nIn, nOut, kind = "bicubic") {
  const s = nIn / nOut, f = Math.max(s, 1);
  const support = (kind === "bicubic" ? 2 : 1) * f, kernel = kind === "bicubic" ? cubic : linear;
  const out = [];
  for (let i = 0; i < nOut; i++) {
    const c = (i + 0.5) * s;
    const lo = Math.max(Math.trunc(c - support + 0.5), 0), hi = Math.min(Math.trunc(c + support + 0.5), nIn);
    const k = [];
    for (let j = lo; j < hi; j++) k.push(kernel((j - c + 0.5) / f));
    const sum = k.reduce((a, b) => a + b, 0);
    const q = Int32Array.from(k, (v) => { const w = v / sum; return w >= 0 ? Math.trunc(w * 4194304 + 0.5) : Math.trunc(w * 4194304 - 0.5); });
    out.push({ lo, q });
  }
  return out;
}

// uint8 RGB [h, w, 3] (row-major) -> uint8 RGB [H, W, 3].
export function resizeRGB(rgb, h, w, H, W, kind = "bicubic") {
  let src = rgb, sw = w;
  if (w !== W) {  // width pass
    const wx = passWeights(w, W, kind), dst = new Uint8Array(h * W * 3);
    for (let y = 0; y < h; y++) for (let x = 0; x < W; x++) {
      const { lo, q } = wx[x];
      for (let ch = 0; ch < 3; ch++) {
        let acc = 2097152;
        for (let j = 0; j < q.length; j++) acc += q[j] * src[(y * w + lo + j) * 3 + ch];
        dst[(y * W + x) * 3 + ch] = Math.min(255, Math.max(0, Math.floor(acc / 4194304)));
      }
    }
    src = dst; sw = W;
  }
  if (h !== H) {  // height pass
    const wy = passWeights(h, H, kind), dst = new Uint8Array(H * sw * 3);
    for (let y = 0; y < H; y++) {
      const { lo, q } = wy[y];
      for (let x = 0; x < sw; x++) for (let ch = 0; ch < 3; ch++) {
        let acc = 2097152;
        for (let j = 0; j < q.length; j++) acc += q[j] * src[((lo + j) * sw + x) * 3 + ch];
        dst[(y * sw + x) * 3 + ch] = Math.min(255, Math.max(0, Math.floor(acc / 4194304)));
      }
    }
    src = dst;
  }
  return src;
}

// uint8 RGB [H, W, 3] -> Float32Array [3, H, W]: (float32(v) * float32(scale) - mean[c]) / std[c] in float32.
export function normalise(rgb, H, W, mean, std, scale = 1 / 255) {
  const f = Math.fround, out = new Float32Array(3 * H * W), s = f(scale);
  for (let ch = 0; ch < 3; ch++) {
    const m = f(mean[ch]), d = f(std[ch]);
    const lut = Float32Array.from({ length: 256 }, (_, v) => f(f(f(v * s) - m) / d));
    for (let i = 0; i < H * W; i++) out[ch * H * W + i] = lut[rgb[i * 3 + ch]];
  }
  return out;
}

// The manifest's preprocessing on decoded RGB bytes: pixel_values for one image, [3, H, W].
export function preprocess(rgb, h, w, pre) {
  const [H, W] = pre.resolution;
  return normalise(resizeRGB(rgb, h, w, H, W, pre.interpolation), H, W, pre.mean, pre.std, pre.scale);
}
