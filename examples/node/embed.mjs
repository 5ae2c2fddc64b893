// Embed images with an itae-export model from Node.js (onnxruntime-node, CPU; no custom-op library).
//
//   node embed.mjs MODEL.onnx INPUT.f32 [BATCH]
//
// INPUT.f32 holds float32 pixels, little-endian, laid out [batch, 3, H, W], already normalised
// with the mean and std of MODEL.json ("preprocessing"). Decode and resize with any image library
// (e.g. sharp: resize to H x W with the "cubic" kernel, then (x/255 - mean) / std per channel).
// Prints {"embedding": [[...]], "artifact_mask": [[...]], "manifest": {...}} as JSON.
import { readFileSync, existsSync } from "node:fs";
import * as ort from "onnxruntime-node";

const [modelPath, inputPath, batchArg] = process.argv.slice(2);
if (!modelPath || !inputPath) {
  console.error("usage: node embed.mjs MODEL.onnx INPUT.f32 [BATCH]");
  process.exit(2);
}
const manifestPath = modelPath.replace(/\.onnx$/, ".json");
if (!existsSync(manifestPath)) {
  console.error(`${manifestPath}: no manifest beside the model`);
  process.exit(2);
}
const manifest = JSON.parse(readFileSync(manifestPath, "utf8"));
const [H, W] = manifest.preprocessing.resolution;
const buf = readFileSync(inputPath);
const pixels = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
const perImage = 3 * H * W;
const batch = batchArg ? Number(batchArg) : pixels.length / perImage;
if (!Number.isInteger(batch) || batch * perImage !== pixels.length) {
  console.error(`${inputPath}: ${pixels.length} floats is not a whole number of [3, ${H}, ${W}] images`);
  process.exit(2);
}

const session = await ort.InferenceSession.create(modelPath, { executionProviders: ["cpu"] });
const input = new ort.Tensor("float32", pixels, [batch, 3, H, W]);
const out = await session.run({ pixel_values: input });
const D = out.embedding.dims[1];
const rows = (t, width) => Array.from({ length: batch }, (_, i) => Array.from(t.data.slice(i * width, (i + 1) * width)));
console.log(JSON.stringify({
  embedding: rows(out.embedding, D),
  artifact_mask: rows(out.artifact_mask, out.artifact_mask.dims[1]).map((r) => r.map(Boolean)),
  manifest: { model: manifest.model, theta: manifest.itae.theta, embed_dim: D },
}));
