// itae-export in the browser: onnxruntime-web, WASM (WebGPU where available).
// The in-graph variant takes image: uint8 [1, h, w, 3] RGB; the plain graph takes pixel_values float32 [n, 3, H, W].
import * as ort from "./node_modules/onnxruntime-web/dist/ort.all.min.mjs";
import { preprocess } from "./preprocess.mjs";

ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;
ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = { session: null, manifest: null, items: [], ep: null, modelFile: null, manifestFile: null };

export async function createSession(model, ep) {
  const eps = ep ? [ep] : ("gpu" in navigator ? ["webgpu", "wasm"] : ["wasm"]);
  let lastError;
  for (const e of eps) {
    try {
      const session = await ort.InferenceSession.create(model, { executionProviders: [e] });
      return { session, ep: e };
    } catch (err) { lastError = err; }
  }
  throw lastError;
}

// Decode a Blob to RGB bytes as docs/onnx-contract.md says: EXIF orientation applied, no colour
// management, alpha composited on white with round((c a + 255 (255 - a)) / 255).
export async function decodeToRGB(blob) {
  const bmp = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none",
                                              imageOrientation: "from-image" });
  const canvas = new OffscreenCanvas(bmp.width, bmp.height);
  const ctx = canvas.getContext("2d", { colorSpace: "srgb", willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0);
  const rgba = ctx.getImageData(0, 0, bmp.width, bmp.height).data;
  const rgb = new Uint8Array(bmp.width * bmp.height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    const a = rgba[i + 3];
    for (let c = 0; c < 3; c++) {
      const v = rgba[i + c];
      rgb[j + c] = a === 255 ? v : Math.floor((2 * (v * a + 255 * (255 - a)) + 255) / 510);
    }
  }
  return { rgb, height: bmp.height, width: bmp.width, bitmap: bmp };
}

export async function embedRGB(session, rgb, height, width) {
  const out = await session.run({ image: new ort.Tensor("uint8", rgb, [1, height, width, 3]) });
  return { embedding: Array.from(out.embedding.data), mask: Array.from(out.artifact_mask.data, Boolean),
           maskType: out.artifact_mask.type, maskData: out.artifact_mask.data.constructor.name };
}

export async function embedTensor(session, pixels, shape) {
  const out = await session.run({ pixel_values: new ort.Tensor("float32", pixels, shape) });
  const n = shape[0], d = out.embedding.dims[1], t = out.artifact_mask.dims[1];
  return Array.from({ length: n }, (_, i) => ({
    embedding: Array.from(out.embedding.data.slice(i * d, (i + 1) * d)),
    mask: Array.from(out.artifact_mask.data.slice(i * t, (i + 1) * t), Boolean) }));
}

const normalise = (v) => { const s = Math.hypot(...v) || 1; return v.map((x) => x / s); };
const dot = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0);

// K-Means on L2-normalised embeddings (Lloyd, farthest-point start from the first image: deterministic).
export function kmeans(vectors, k, iterations = 50) {
  const xs = vectors.map(normalise);
  k = Math.max(1, Math.min(k, xs.length));
  const centres = [xs[0]];
  while (centres.length < k) {
    let best = 0, bestD = -1;
    xs.forEach((x, i) => { const d = Math.min(...centres.map((c) => 1 - dot(x, c))); if (d > bestD) { bestD = d; best = i; } });
    centres.push(xs[best]);
  }
  let labels = [];
  for (let it = 0; it < iterations; it++) {
    const next = xs.map((x) => centres.reduce((b, c, j) => (dot(x, c) > dot(x, centres[b]) ? j : b), 0));
    if (next.join() === labels.join()) break;
    labels = next;
    for (let j = 0; j < k; j++) {
      const members = xs.filter((_, i) => labels[i] === j);
      if (members.length) centres[j] = normalise(members[0].map((_, d) => members.reduce((s, m) => s + m[d], 0)));
    }
  }
  return labels;
}

function drawCard(item) {
  const m = state.manifest, [H, W] = m.preprocessing.resolution, p = m.arch.patch_size;
  const gh = H / p, gw = W / p, regs = m.num_register_tokens || 0;
  const canvas = item.canvas;
  const ctx = canvas.getContext("2d");
  canvas.width = 224; canvas.height = 224;
  ctx.drawImage(item.bitmap, 0, 0, 224, 224);  // squash, as the model sees it
  ctx.strokeStyle = "rgba(255,0,80,0.9)"; ctx.fillStyle = "rgba(255,0,80,0.25)"; ctx.lineWidth = 1;
  item.mask.slice(regs).forEach((flag, t) => {
    if (!flag) return;
    const r = Math.floor(t / gw), c = t % gw, cw = 224 / gw, ch = 224 / gh;
    ctx.fillRect(c * cw, r * ch, cw, ch); ctx.strokeRect(c * cw, r * ch, cw, ch);
  });
}

function render() {
  const items = state.items;
  const labels = kmeans(items.map((i) => i.embedding), Number($("k").value) || 2);
  const xs = items.map((i) => normalise(i.embedding));
  $("cards").replaceChildren(...items.map((item, i) => {
    item.cluster = labels[i];
    const near = xs.map((x, j) => [j, dot(xs[i], x)]).filter(([j]) => j !== i).sort((a, b) => b[1] - a[1]).slice(0, 3);
    const div = document.createElement("div");
    div.className = "card";
    div.append(item.canvas);
    const info = document.createElement("div");
    const artifacts = item.mask.filter(Boolean).length;
    info.innerHTML = `<div><b>${item.name}</b> (${item.width}&times;${item.height})</div>
      <div class="cluster">cluster ${labels[i]}</div><div>artifact tokens: ${artifacts}</div>
      <div>neighbours: ${near.map(([j, s]) => `${items[j].name} (${s.toFixed(3)})`).join(", ") || "-"}</div>`;
    div.append(info);
    drawCard(item);
    return div;
  }));
}

async function addImage(blob, name) {
  const d = await decodeToRGB(blob);
  const m = state.manifest;
  const r = m.inputs[0].name === "image" ? await embedRGB(state.session, d.rgb, d.height, d.width)
    : (await embedTensor(state.session, preprocess(d.rgb, d.height, d.width, m.preprocessing),
                         [1, 3, ...m.preprocessing.resolution]))[0];  // the plain graph: the JS port of the contract
  state.items.push({ name, ...d, ...r, canvas: document.createElement("canvas") });
}

async function loadModel(modelBytesOrUrl, manifest) {
  if (manifest.inputs[0].name !== "image") {
    $("status").textContent = "The plain graph (pixel_values): preprocessed in JavaScript (preprocess.mjs); the in-graph variant (--preprocess-in-graph) needs no port.";
  }
  const { session, ep } = await createSession(modelBytesOrUrl, params.get("ep"));
  Object.assign(state, { session, ep, manifest, items: [] });
  $("backend").textContent = ep;
  $("model").textContent = `${manifest.model} (theta ${manifest.itae.theta})`;
}

async function handleFiles(files) {
  const list = Array.from(files);
  for (const f of list) {
    if (f.name.endsWith(".onnx")) state.modelFile = f;
    if (f.name.endsWith(".json")) state.manifestFile = f;
  }
  if (state.modelFile && state.manifestFile && (!state.session || list.includes(state.modelFile))) {
    await loadModel(new Uint8Array(await state.modelFile.arrayBuffer()), JSON.parse(await state.manifestFile.text()));
  }
  for (const f of list.filter((f) => f.type.startsWith("image/"))) {
    if (!state.session) { $("status").textContent = "Drop the model first."; return; }
    $("status").textContent = `embedding ${f.name} ...`;
    await addImage(f, f.name);
  }
  $("status").textContent = "";
  if (state.items.length) render();
}

// Test mode (?test=plan.json): run the plan, POST the results to plan.report. Used by tests/test_browser.py.
async function runPlan(url) {
  const plan = await (await fetch(url)).json();
  const result = { limits: $("limits").textContent, crossOriginIsolated: globalThis.crossOriginIsolated };
  try {
    const img = plan.in_graph;
    await loadModel(img.model, await (await fetch(img.manifest)).json());
    result.ep = state.ep;
    for (const u of img.images) await addImage(await (await fetch(u)).blob(), u.split("/").pop());
    render();
    result.in_graph = state.items.map((i) => ({ name: i.name, embedding: i.embedding, mask: i.mask, cluster: i.cluster,
                                                maskType: i.maskType, maskData: i.maskData, rgb: Array.from(i.rgb) }));
    result.cards = Array.from(document.querySelectorAll(".card"), (c) => c.textContent);
    const plain = plan.plain;
    const { session } = await createSession(plain.model, params.get("ep") || "wasm");
    const buf = await (await fetch(plain.tensors)).arrayBuffer();
    result.plain = await embedTensor(session, new Float32Array(buf), plain.shape);
    // the plain graph again, fed the JavaScript port of the contract (preprocess.mjs) from the canvas
    const pm = await (await fetch(plain.manifest)).json();
    result.plain_js = [];
    for (const u of img.images) {
      const d = await decodeToRGB(await (await fetch(u)).blob());
      const [r] = await embedTensor(session, preprocess(d.rgb, d.height, d.width, pm.preprocessing),
                                    [1, 3, ...pm.preprocessing.resolution]);
      result.plain_js.push(r);
    }
  } catch (err) {
    result.error = String(err && err.stack || err);
  }
  await fetch(plan.report, { method: "POST", body: JSON.stringify(result), headers: { "Content-Type": "application/json" } });
  document.body.dataset.done = "1";
}

$("files").addEventListener("change", (e) => handleFiles(e.target.files));
$("k").addEventListener("change", () => state.items.length && render());
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handleFiles(e.dataTransfer.files); });

if (params.get("test")) runPlan(params.get("test"));
else if (params.get("model")) {
  const m = params.get("model");
  fetch(m.replace(/\.onnx$/, ".json")).then((r) => r.json()).then((man) => loadModel(m, man))
    .catch((e) => { $("status").textContent = `cannot load ${m}: ${e}`; });
}
