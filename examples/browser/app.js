// itae-export in the browser: onnxruntime-web, WASM (WebGPU where available).
// The in-graph variant takes image: uint8 [1, h, w, 3] RGB; the plain graph takes pixel_values float32 [n, 3, H, W].
import * as ort from "./node_modules/onnxruntime-web/dist/ort.all.min.mjs";
import { preprocess } from "./preprocess.mjs";
import { decodeToRGB, RefusedImage } from "./decode.mjs";
import { artifactSummary } from "./artifacts.mjs";

ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;
ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = { session: null, manifest: null, items: [], refused: [], ep: null, modelFile: null, manifestFile: null };

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

// Decode a file to RGB bytes as docs/onnx-contract.md says (steps 1-4): decode.mjs, WASM and JS
// decoders that give Pillow's bytes; the canvas is only used to draw.
export async function decodeBlob(blob, name) {
  return decodeToRGB(new Uint8Array(await blob.arrayBuffer()), name);
}

// RGB bytes -> a canvas of that size (for drawing only).
function rgbCanvas(rgb, height, width) {
  const c = new OffscreenCanvas(width, height), rgba = new Uint8ClampedArray(width * height * 4);
  for (let i = 0, j = 0; j < rgb.length; i += 4, j += 3) { rgba[i] = rgb[j]; rgba[i + 1] = rgb[j + 1]; rgba[i + 2] = rgb[j + 2]; rgba[i + 3] = 255; }
  c.getContext("2d").putImageData(new ImageData(rgba, width, height), 0, 0);
  return c;
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
  ctx.drawImage(rgbCanvas(item.rgb, item.height, item.width), 0, 0, 224, 224);  // squash, as the model sees it
  ctx.strokeStyle = "rgba(255,0,80,0.9)"; ctx.fillStyle = "rgba(255,0,80,0.25)"; ctx.lineWidth = 1;
  item.mask.slice(regs).forEach((flag, t) => {
    if (!flag) return;
    const r = Math.floor(t / gw), c = t % gw, cw = 224 / gw, ch = 224 / gh;
    ctx.fillRect(c * cw, r * ch, cw, ch); ctx.strokeRect(c * cw, r * ch, cw, ch);
  });
}

// The run's artifact counts, and the warning when the share of flagged tokens is not a few
// artifacts but ordinary patches (the overlay then covers much of every image).
function renderArtifacts() {
  const m = state.manifest, s = artifactSummary(state.items.map((i) => i.mask), m.itae.theta);
  if (m.itae.enabled === false) s.line = "Artifacts: ITAE is off (--no-itae), no token was attenuated";
  $("artifacts").textContent = s.line;
  $("artifact-warning").textContent = m.itae.enabled === false ? "" : (s.warning || "");
  $("artifact-warning").hidden = !$("artifact-warning").textContent;
  return s;
}

function render() {
  const items = state.items;
  renderArtifacts();
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

// A refused or failed image: a visible line on the page (and in the test report).
function refuse(name, err) {
  const li = document.createElement("li");
  li.textContent = err instanceof RefusedImage ? err.message : `${name}: ${err && err.message || err}`;
  $("errors").append(li);
  state.refused.push(li.textContent);
}

// The page's embeddings as JSON: what "Download embeddings" saves and the module API returns.
export function embeddingsJSON() {
  const m = state.manifest;
  return {
    model: m && m.model, theta: m && m.itae.theta, input: m && m.inputs[0].name, backend: state.ep,
    embedding_dim: state.items.length ? state.items[0].embedding.length : null,
    items: state.items.map((i) => ({ name: i.name, height: i.height, width: i.width, notes: i.notes,
                                     embedding: i.embedding, artifact_mask: i.mask, cluster: i.cluster })),
    refused: [...state.refused],
  };
}

export function downloadEmbeddings() {
  const url = URL.createObjectURL(new Blob([JSON.stringify(embeddingsJSON())], { type: "application/json" }));
  const a = $("download");
  a.href = url;
  a.download = "embeddings.json";
  return a;
}

async function addImage(blob, name) {
  let d;
  try {
    d = await decodeBlob(blob, name);
  } catch (err) {
    refuse(name, err);
    return;
  }
  const m = state.manifest;
  const r = m.inputs[0].name === "image" ? await embedRGB(state.session, d.rgb, d.height, d.width)
    : (await embedTensor(state.session, preprocess(d.rgb, d.height, d.width, m.preprocessing),
                         [1, 3, ...m.preprocessing.resolution]))[0];  // the plain graph: the JS port of the contract
  state.items.push({ name, ...d, ...r, canvas: document.createElement("canvas") });
}

// The in-graph variant (NAME_image.onnx) is the page's default: given NAME.onnx, it is used when
// it sits beside it; the plain graph only when there is no in-graph file.
async function preferInGraph(url) {
  if (/_image\.onnx$/.test(url)) return url;
  const alt = url.replace(/\.onnx$/, "_image.onnx");
  try {
    const r = await fetch(alt.replace(/\.onnx$/, ".json"), { method: "HEAD" });
    if (r.ok) return alt;
  } catch { /* no in-graph file beside it */ }
  return url;
}

async function loadModel(modelBytesOrUrl, manifest) {
  if (manifest.inputs[0].name !== "image") {
    $("status").textContent = "The plain graph (pixel_values): preprocessed in JavaScript (preprocess.mjs); the in-graph variant (--preprocess-in-graph) needs no port.";
  }
  const { session, ep } = await createSession(modelBytesOrUrl, params.get("ep"));
  Object.assign(state, { session, ep, manifest, items: [], refused: [] });
  $("errors").replaceChildren();
  $("backend").textContent = ep;
  $("model").textContent = `${manifest.model} (theta ${manifest.itae.theta})`;
}

async function handleFiles(files) {
  const list = Array.from(files);
  const onnx = list.filter((f) => f.name.endsWith(".onnx"));
  const model = onnx.find((f) => f.name.endsWith("_image.onnx")) || onnx[0];  // the in-graph variant first
  if (model) {
    state.modelFile = model;
    state.manifestFile = list.find((f) => f.name === model.name.replace(/\.onnx$/, ".json")) || null;
  } else if (!state.manifestFile) {
    state.manifestFile = list.find((f) => f.name.endsWith(".json")) || null;
  }
  if (state.modelFile && !state.manifestFile) {
    $("status").textContent = `${state.modelFile.name}: drop its manifest ${state.modelFile.name.replace(/\.onnx$/, ".json")} too`;
    return;
  }
  if (state.modelFile && state.manifestFile && (!state.session || list.includes(state.modelFile))) {
    try {
      await loadModel(new Uint8Array(await state.modelFile.arrayBuffer()), JSON.parse(await state.manifestFile.text()));
    } catch (err) {
      $("status").textContent = `${state.modelFile.name}: cannot load: ${err && err.message || err}`;
      return;
    }
  }
  for (const f of list.filter((f) => !/\.(onnx|json)$/.test(f.name))) {
    if (!state.session) { $("status").textContent = "Drop the model first."; return; }
    $("status").textContent = `embedding ${f.name} ...`;
    await addImage(f, f.name);
  }
  $("status").textContent = "";
  if (state.items.length) { render(); downloadEmbeddings(); }
}

// Test mode (?test=plan.json): run the plan, POST the results to plan.report. Used by tests/test_browser.py.
async function runPlan(url) {
  const plan = await (await fetch(url)).json();
  const result = { limits: $("limits").textContent, crossOriginIsolated: globalThis.crossOriginIsolated };
  try {
    const img = plan.in_graph;
    const modelUrl = await preferInGraph(img.model);
    await loadModel(modelUrl, await (await fetch(modelUrl.replace(/\.onnx$/, ".json"))).json());
    result.ep = state.ep;
    result.input = state.manifest.inputs[0].name;
    for (const u of img.images) await addImage(await (await fetch(u)).blob(), u.split("/").pop());
    render();
    result.in_graph = state.items.map((i) => ({ name: i.name, embedding: i.embedding, mask: i.mask, cluster: i.cluster,
                                                maskType: i.maskType, maskData: i.maskData, rgb: Array.from(i.rgb),
                                                height: i.height, width: i.width }));
    result.cards = Array.from(document.querySelectorAll(".card"), (c) => c.textContent);
    result.artifacts = { line: $("artifacts").textContent, warning: $("artifact-warning").textContent,
                         warningVisible: $("artifact-warning").offsetParent !== null };
    result.errors = Array.from(document.querySelectorAll("#errors li"), (li) => li.textContent);
    // what the download link saves, read back from its blob: URL
    const a = downloadEmbeddings();
    result.download = { name: a.download, text: await (await fetch(a.href)).text(), visible: a.offsetParent !== null };
    const plain = plan.plain;
    const { session } = await createSession(plain.model, params.get("ep") || "wasm");
    const buf = await (await fetch(plain.tensors)).arrayBuffer();
    result.plain = await embedTensor(session, new Float32Array(buf), plain.shape);
    // the plain graph again, fed the JavaScript port of the contract (preprocess.mjs) from the canvas
    const pm = await (await fetch(plain.manifest)).json();
    result.plain_js = [];
    for (const u of plain.images || []) {
      const d = await decodeBlob(await (await fetch(u)).blob(), u);
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
$("download").addEventListener("click", () => downloadEmbeddings());  // the href is read after this handler
$("k").addEventListener("change", () => state.items.length && render());
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handleFiles(e.dataTransfer.files); });

if (params.get("test")) runPlan(params.get("test"));
else if (params.get("model")) {
  preferInGraph(params.get("model")).then((m) => fetch(m.replace(/\.onnx$/, ".json")).then((r) => r.json())
    .then((man) => loadModel(m, man))
    .catch((e) => { $("status").textContent = `cannot load ${m}: ${e}`; }));
}

// The module API: import("./app.js") in the page's console or from another module.
globalThis.itae = { embeddingsJSON, downloadEmbeddings, decodeBlob };
