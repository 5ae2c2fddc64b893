// Embed images with an itae-export model from Node.js (onnxruntime-node, CPU; no custom-op library).
//
//   node embed.mjs MODEL.onnx INPUT.f32 [BATCH]
//   node embed.mjs MODEL_image.onnx INPUT.u8 HEIGHT WIDTH      (the --preprocess-in-graph variant)
//
// INPUT.f32 holds float32 pixels, little-endian, laid out [batch, 3, H, W], already preprocessed
// with the preprocessing of MODEL.json, step by step as docs/onnx-contract.md states it (the one
// statement of the rule; ../browser/preprocess.mjs is a port of it). For the in-graph variant,
// INPUT.u8 holds the decoded RGB bytes [batch, HEIGHT, WIDTH, 3] of images of one size; the graph
// resizes and normalises. Prints {"embedding": [[...]], "artifact_mask": [[...]], "manifest": {...}} as JSON.
import { readFileSync, existsSync } from "node:fs";
import * as ort from "onnxruntime-node";

const [modelPath, inputPath, ...rest] = process.argv.slice(2);
if (!modelPath || !inputPath) {
  console.error("usage: node embed.mjs MODEL.onnx INPUT.f32 [BATCH] | MODEL_image.onnx INPUT.u8 HEIGHT WIDTH");
  process.exit(2);
}
const manifestPath = modelPath.replace(/\.onnx$/, ".json");
if (!existsSync(manifestPath)) {
  console.error(`${manifestPath}: no manifest beside the model`);
  process.exit(2);
}
const manifest = JSON.parse(readFileSync(manifestPath, "utf8"));
const buf = readFileSync(inputPath);
const inGraph = manifest.inputs[0].name === "image";
let feeds, batch;
if (inGraph) {
  const [h, w] = rest.map(Number);
  const perImage = 3 * h * w;
  batch = buf.byteLength / perImage;
  if (!(h > 0 && w > 0) || !Number.isInteger(batch) || batch < 1) {
    console.error(`${inputPath}: ${buf.byteLength} bytes is not a whole number of [${h}, ${w}, 3] images (give HEIGHT WIDTH)`);
    process.exit(2);
  }
  const bytes = new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
  feeds = { image: new ort.Tensor("uint8", bytes, [batch, h, w, 3]) };
} else {
  const [H, W] = manifest.preprocessing.resolution;
  const pixels = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
  const perImage = 3 * H * W;
  batch = rest[0] ? Number(rest[0]) : pixels.length / perImage;
  if (!Number.isInteger(batch) || batch * perImage !== pixels.length) {
    console.error(`${inputPath}: ${pixels.length} floats is not a whole number of [3, ${H}, ${W}] images`);
    process.exit(2);
  }
  feeds = { pixel_values: new ort.Tensor("float32", pixels, [batch, 3, H, W]) };
}

const session = await ort.InferenceSession.create(modelPath, { executionProviders: ["cpu"] });
const out = await session.run(feeds);
const D = out.embedding.dims[1];
const rows = (t, width) => Array.from({ length: batch }, (_, i) => Array.from(t.data.slice(i * width, (i + 1) * width)));
// the bool output arrives as a Uint8Array of 0/1 (out.artifact_mask.type === "bool")
console.log(JSON.stringify({
  embedding: rows(out.embedding, D),
  artifact_mask: rows(out.artifact_mask, out.artifact_mask.dims[1]).map((r) => r.map(Boolean)),
  mask_type: out.artifact_mask.type,
  mask_data: out.artifact_mask.data.constructor.name,
  manifest: { model: manifest.model, theta: manifest.itae.theta, embed_dim: D },
}));
