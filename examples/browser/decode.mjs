// Steps 1-4 of docs/onnx-contract.md ("Preprocessing"): a file's bytes to the RGB bytes that
// Pillow gives, without the browser's canvas (which applies tRNS colour keys, rounds 16-bit
// samples its own way and ignores XMP and raw-profile orientation). The decoders are the ones
// the contract names under "Decoders known to match": @jsquash/jpeg (libjpeg-turbo code, WASM),
// @jsquash/webp (libwebp, WASM) and fast-png (raw samples, palette and tRNS as stored); the
// rules applied to their output (orientation sources, bit depths, alpha on white) are the
// contract's, not restated here. Works in browsers (index.html's import map) and in Node.js.
import decodeJpeg from "@jsquash/jpeg/decode.js";
import decodeWebp from "@jsquash/webp/decode.js";
import { decode as decodePngRaw } from "fast-png";
import { unzlibSync, zlibSync } from "fflate";

// A file the page cannot turn into the contract's RGB: `message` says which file and why.
export class RefusedImage extends Error {
  constructor(name, reason) {
    super(`${name}: ${reason}`);
    this.name = "RefusedImage";
    this.reason = reason;
  }
}

export const DEFAULT_MAX_PIXELS = 120_000_000;  // the contract's size limit ("The size limit")

const ascii = (u8, a = 0, b = u8.length) => String.fromCharCode(...u8.subarray(a, Math.min(b, a + 65536)));
const latin1 = (u8) => { let s = ""; for (let i = 0; i < u8.length; i += 65536) s += String.fromCharCode(...u8.subarray(i, i + 65536)); return s; };

export function sniff(u8) {
  if (u8[0] === 0xff && u8[1] === 0xd8) return "jpeg";
  if (u8[0] === 0x89 && ascii(u8, 1, 4) === "PNG") return "png";
  if (ascii(u8, 0, 4) === "RIFF" && ascii(u8, 8, 12) === "WEBP") return "webp";
  if (ascii(u8, 0, 3) === "GIF") return "gif";
  if (ascii(u8, 0, 2) === "BM") return "bmp";
  if (ascii(u8, 0, 4) === "II*\0" || ascii(u8, 0, 4) === "MM\0*") return "tiff";
  return null;
}

// ------------------------------------------------------------------ orientation (step 2)

// The Orientation tag (0x0112) of IFD0 of an EXIF block (optionally "Exif\0\0" first):
// a number, or null when the block has no such tag; throws on a block that cannot be read.
export function exifOrientation(block) {
  let b = block;
  if (ascii(b, 0, 6) === "Exif\0\0") b = b.subarray(6);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const order = ascii(b, 0, 2);
  if (order !== "II" && order !== "MM") throw new Error("not a TIFF header");
  const le = order === "II";
  const ifd = dv.getUint32(4, le), n = dv.getUint16(ifd, le);
  for (let i = 0; i < n; i++) {
    const e = ifd + 2 + 12 * i;
    if (dv.getUint16(e, le) === 0x0112) {
      const type = dv.getUint16(e + 2, le);
      return type === 3 ? dv.getUint16(e + 8, le) : type === 4 ? dv.getUint32(e + 8, le) : dv.getUint8(e + 8);
    }
  }
  return null;
}

export function xmpOrientation(text) {
  const m = /tiff:Orientation(="|>)([0-9])/.exec(text || "");
  return m ? Number(m[2]) : null;
}

// meta: {exif: Uint8Array|null, xmp: string|null} -> the orientation the contract applies.
export function orientationOf(meta) {
  let o = null, source = "exif";
  if (meta.exif) {
    try { o = exifOrientation(meta.exif); } catch { return { value: 1, note: "EXIF orientation unreadable, ignored" }; }
  }
  if (o === null) { o = xmpOrientation(meta.xmp); source = "xmp"; }
  return { value: o ?? 1, source };
}

// RGB [h, w, 3] -> the transposed image, as PIL.ImageOps.exif_transpose.
export function orient(rgb, h, w, o) {
  if (!(o >= 2 && o <= 8)) return { rgb, height: h, width: w };
  const swap = o >= 5, H = swap ? w : h, W = swap ? h : w, out = new Uint8Array(rgb.length);
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    let sy, sx;  // the stored pixel shown at (y, x)
    switch (o) {
      case 2: sy = y; sx = w - 1 - x; break;
      case 3: sy = h - 1 - y; sx = w - 1 - x; break;
      case 4: sy = h - 1 - y; sx = x; break;
      case 5: sy = x; sx = y; break;
      case 6: sy = h - 1 - x; sx = y; break;
      case 7: sy = h - 1 - x; sx = w - 1 - y; break;
      case 8: sy = x; sx = w - 1 - y; break;
    }
    const d = (y * W + x) * 3, s = (sy * w + sx) * 3;
    out[d] = rgb[s]; out[d + 1] = rgb[s + 1]; out[d + 2] = rgb[s + 2];
  }
  return { rgb: out, height: H, width: W };
}

// ------------------------------------------------------------------ containers: size and metadata

function jpegInfo(u8) {
  const meta = { exif: null, xmp: null, components: 3, width: 0, height: 0, complete: false };
  let i = 2;
  while (i + 4 <= u8.length) {
    if (u8[i] !== 0xff) { i++; continue; }
    const marker = u8[i + 1];
    if (marker === 0xff) { i++; continue; }
    if (marker === 0xd8 || (marker >= 0xd0 && marker <= 0xd7) || marker === 0x01) { i += 2; continue; }
    if (marker === 0xd9) break;
    if (marker === 0xda) {  // entropy-coded data follows; 0xFF 0xD9 cannot occur inside it (0xFF is stuffed)
      for (let k = i + 2; k + 1 < u8.length; k++) if (u8[k] === 0xff && u8[k + 1] === 0xd9) { meta.complete = true; break; }
      break;
    }
    const len = (u8[i + 2] << 8) | u8[i + 3], s = u8.subarray(i + 4, i + 2 + len);
    if (marker === 0xe1 && ascii(s, 0, 6) === "Exif\0\0") {
      meta.exif = meta.exif ? concat(meta.exif, s.subarray(6)) : s;
    } else if (marker === 0xe1 && ascii(s, 0, 29) === "http://ns.adobe.com/xap/1.0/\0") {
      meta.xmp = latin1(s.subarray(29));
    } else if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
      meta.height = (s[1] << 8) | s[2]; meta.width = (s[3] << 8) | s[4]; meta.components = s[5];
    }
    i += 2 + len;
  }
  return meta;
}

const concat = (a, b) => { const c = new Uint8Array(a.length + b.length); c.set(a); c.set(b, a.length); return c; };

function pngInfo(u8) {
  const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  const meta = { exif: null, xmp: null, rawProfile: null, width: dv.getUint32(16), height: dv.getUint32(20) };
  const text = {};
  for (let i = 8; i + 8 <= u8.length;) {
    const len = dv.getUint32(i), type = ascii(u8, i + 4, i + 8), d = u8.subarray(i + 8, i + 8 + len);
    if (type === "eXIf") meta.exif = d;  // the last one, as Pillow keeps it
    if (type === "tEXt" || type === "zTXt" || type === "iTXt") {
      const z = d.indexOf(0), key = ascii(d, 0, z);
      let v;
      if (type === "tEXt") v = d.subarray(z + 1);
      else if (type === "zTXt") v = unzlibSync(d.subarray(z + 2));
      else {  // iTXt: keyword\0 flag method lang\0 translated\0 text
        const flag = d[z + 1], l1 = d.indexOf(0, z + 3), l2 = d.indexOf(0, l1 + 1);
        v = flag ? unzlibSync(d.subarray(l2 + 1)) : d.subarray(l2 + 1);
      }
      text[key] = latin1(v);  // of several chunks with one keyword, the last, as Pillow keeps it
      if (type === "iTXt" && key === "XML:com.adobe.xmp") text.__xmp = new TextDecoder().decode(v);
    }
    if (type === "IEND") break;
    i += 12 + len;
  }
  if (!meta.exif && typeof text.exif === "string") meta.exif = Uint8Array.from(text.exif, (c) => c.charCodeAt(0));
  if (!meta.exif && text["Raw profile type exif"] !== undefined) {
    const hex = text["Raw profile type exif"].split("\n").slice(3).join("").replace(/\s+/g, "");
    meta.exif = Uint8Array.from(hex.match(/../g) || [], (h) => parseInt(h, 16));
    meta.rawProfile = true;
  }
  meta.xmp = text["XML:com.adobe.xmp"] ?? text.__xmp ?? null;
  return meta;
}

function webpInfo(u8) {
  const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  const meta = { exif: null, xmp: null, width: 0, height: 0 };
  for (let i = 12; i + 8 <= u8.length;) {
    const type = ascii(u8, i, i + 4), len = dv.getUint32(i + 4, true), d = u8.subarray(i + 8, i + 8 + len);
    if (type === "EXIF" && !meta.exif) meta.exif = d;  // the first of each, as libwebp's demuxer gives it
    if (type === "XMP " && meta.xmp === null) meta.xmp = latin1(d);
    if (type === "VP8X") { meta.width = 1 + (d[4] | (d[5] << 8) | (d[6] << 16)); meta.height = 1 + (d[7] | (d[8] << 8) | (d[9] << 16)); }
    if (type === "VP8 " && !meta.width) { meta.width = dv.getUint16(i + 14, true) & 0x3fff; meta.height = dv.getUint16(i + 16, true) & 0x3fff; }
    if (type === "VP8L" && !meta.width) { const b = dv.getUint32(i + 9, true); meta.width = 1 + (b & 0x3fff); meta.height = 1 + ((b >> 14) & 0x3fff); }
    i += 8 + len + (len & 1);
  }
  return meta;
}

// ------------------------------------------------------------------ pixels (steps 1 and 4)

const onWhite = (c, a) => Math.floor((2 * (c * a + 255 * (255 - a)) + 255) / 510);

function rgbaToRGB(data, n) {  // 8-bit RGBA (alpha 255 where there is none) -> RGB on white
  const rgb = new Uint8Array(n * 3);
  for (let i = 0, j = 0; j < n * 3; i += 4, j += 3) {
    const a = data[i + 3];
    for (let c = 0; c < 3; c++) rgb[j + c] = a === 255 ? data[i + c] : onWhite(data[i + c], a);
  }
  return rgb;
}

// fast-png's raw output -> RGB, by the contract's PNG table (step 4).
function pngToRGB(png) {
  const { width: w, height: h, depth, channels, data, palette } = png;
  const n = w * h, rgb = new Uint8Array(n * 3);
  let samples = data;
  if (depth < 8) {  // unpack the rows (each starts on a byte)
    const perLine = Math.ceil((depth * channels * w) / 8), mask = (1 << depth) - 1;
    samples = new Uint8Array(n * channels);
    for (let y = 0; y < h; y++) for (let x = 0; x < w * channels; x++) {
      const bit = x * depth, byte = data[y * perLine + (bit >> 3)];
      samples[y * w * channels + x] = (byte >> (8 - depth - (bit & 7))) & mask;
    }
  }
  const grey8 = depth === 1 ? 255 : depth === 2 ? 85 : depth === 4 ? 17 : 1;
  for (let p = 0; p < n; p++) {
    const s = p * channels, d = p * 3;
    let r, g, b, a = 255;
    if (palette) {  // colour type 3: the entry; a tRNS entry is its alpha
      const e = palette[samples[s]] || [0, 0, 0];
      [r, g, b] = e; a = e.length > 3 ? e[3] : 255;
    } else if (channels <= 2) {  // grey, grey + alpha
      const v = samples[s];
      r = g = b = depth === 16 ? (channels === 1 ? Math.floor(v / 257 + 0.5) : v >> 8) : v * grey8;
      if (channels === 2) a = depth === 16 ? samples[s + 1] >> 8 : samples[s + 1];
    } else {  // RGB, RGBA: 16-bit keeps the high byte
      const k = depth === 16 ? 8 : 0;
      r = samples[s] >> k; g = samples[s + 1] >> k; b = samples[s + 2] >> k;
      if (channels === 4) a = samples[s + 3] >> k;
    }
    // a tRNS colour key (grey or RGB) is ignored, as Pillow does
    rgb[d] = a === 255 ? r : onWhite(r, a); rgb[d + 1] = a === 255 ? g : onWhite(g, a); rgb[d + 2] = a === 255 ? b : onWhite(b, a);
  }
  return rgb;
}

// fast-png 8.0.0 cannot de-interlace 1, 2 and 4-bit PNGs ("Unsupported filter"): such a file is
// de-interlaced here (Adam7, then the rows unfiltered) and handed to fast-png as the same image,
// not interlaced, with every other chunk (PLTE, tRNS, text) as it was.
const ADAM7 = [[0, 0, 8, 8], [4, 0, 8, 8], [0, 4, 4, 8], [2, 0, 4, 4], [0, 2, 2, 4], [1, 0, 2, 2], [0, 1, 1, 2]];

function paeth(a, b, c) {
  const p = a + b - c, pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

function unfilter(type, line, prev) {  // one byte a pixel at these depths (bpp = 1)
  for (let i = 0; i < line.length; i++) {
    const a = i ? line[i - 1] : 0, b = prev[i], c = i ? prev[i - 1] : 0;
    if (type === 1) line[i] = (line[i] + a) & 255;
    else if (type === 2) line[i] = (line[i] + b) & 255;
    else if (type === 3) line[i] = (line[i] + ((a + b) >> 1)) & 255;
    else if (type === 4) line[i] = (line[i] + paeth(a, b, c)) & 255;
    else if (type !== 0) throw new Error(`bad PNG filter type ${type}`);
  }
}

export function deinterlaceLowDepth(u8) {
  const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  const w = dv.getUint32(16), h = dv.getUint32(20), depth = u8[24];
  if (u8[28] !== 1 || depth >= 8) return u8;
  const chunks = [], idat = [];
  for (let i = 8; i + 8 <= u8.length;) {
    const len = dv.getUint32(i), type = ascii(u8, i + 4, i + 8);
    if (type === "IDAT") idat.push(u8.subarray(i + 8, i + 8 + len));
    else if (type !== "IHDR" && type !== "IEND") chunks.push([type, u8.subarray(i + 8, i + 8 + len)]);
    if (type === "IEND") break;
    i += 12 + len;
  }
  const raw = unzlibSync(idat.reduce(concat, new Uint8Array(0)));
  const mask = (1 << depth) - 1, samples = new Uint8Array(w * h);
  let pos = 0;
  for (const [x0, y0, dx, dy] of ADAM7) {
    const pw = Math.ceil((w - x0) / dx), ph = Math.ceil((h - y0) / dy);
    if (pw <= 0 || ph <= 0) continue;
    const bpl = Math.ceil((pw * depth) / 8);
    let prev = new Uint8Array(bpl);
    for (let r = 0; r < ph; r++) {
      const line = raw.slice(pos + 1, pos + 1 + bpl);
      unfilter(raw[pos], line, prev);
      for (let i = 0; i < pw; i++) {
        const bit = i * depth;
        samples[(y0 + r * dy) * w + x0 + i * dx] = (line[bit >> 3] >> (8 - depth - (bit & 7))) & mask;
      }
      prev = line;
      pos += 1 + bpl;
    }
  }
  const bpl = Math.ceil((w * depth) / 8), rows = new Uint8Array(h * (bpl + 1));
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const bit = x * depth;
    rows[y * (bpl + 1) + 1 + (bit >> 3)] |= samples[y * w + x] << (8 - depth - (bit & 7));
  }
  const chunk = (type, data) => {
    const c = new Uint8Array(12 + data.length), v = new DataView(c.buffer);
    v.setUint32(0, data.length);
    for (let k = 0; k < 4; k++) c[4 + k] = type.charCodeAt(k);
    c.set(data, 8);
    return c;  // CRC left 0: fast-png does not check it by default
  };
  const ihdr = u8.slice(16, 29);
  ihdr[12] = 0;
  const parts = [u8.subarray(0, 8), chunk("IHDR", ihdr), ...chunks.map(([t, d]) => chunk(t, d)),
                 chunk("IDAT", zlibSync(rows)), chunk("IEND", new Uint8Array(0))];
  return parts.reduce(concat, new Uint8Array(0));
}

// bytes of one file -> {rgb: Uint8Array [h*w*3], height, width, notes: [...]}; throws RefusedImage.
export async function decodeToRGB(bytes, name = "image", { maxPixels = DEFAULT_MAX_PIXELS } = {}) {
  const u8 = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  if (!u8.length) throw new RefusedImage(name, "empty file");
  const kind = sniff(u8);
  const notes = [];
  let meta, rgb, w, h;
  if (kind === "jpeg") meta = jpegInfo(u8);
  else if (kind === "png") meta = pngInfo(u8);
  else if (kind === "webp") meta = webpInfo(u8);
  else if (kind) throw new RefusedImage(name, `${kind.toUpperCase()} is not decoded by this page (JPEG, PNG and WebP are); itae-cluster reads it`);
  else throw new RefusedImage(name, "not a JPEG, PNG or WebP file");
  if (meta.width * meta.height > maxPixels) {
    throw new RefusedImage(name, `${meta.width}x${meta.height} is ${Math.round(meta.width * meta.height / 1e6)} MP, above the limit of ${maxPixels} pixels`);
  }
  try {
    if (kind === "jpeg") {
      if (meta.components === 4) {
        throw new RefusedImage(name, "CMYK/YCCK JPEG: the page's decoder (@jsquash/jpeg) returns no CMYK; itae-cluster reads it (docs/onnx-contract.md, step 4)");
      }
      // libjpeg-turbo fills a truncated file with grey and only warns; Pillow refuses it
      if (!meta.complete) throw new RefusedImage(name, "cannot decode: truncated image (no end-of-image marker)");
      const im = await decodeJpeg(u8);
      ({ width: w, height: h } = im);
      rgb = rgbaToRGB(im.data, w * h);
    } else if (kind === "webp") {
      const im = await decodeWebp(u8);
      ({ width: w, height: h } = im);
      rgb = rgbaToRGB(im.data, w * h);
    } else {
      const png = decodePngRaw(deinterlaceLowDepth(u8));
      ({ width: w, height: h } = png);
      rgb = pngToRGB(png);
      if (png.depth === 16) notes.push("16-bit scaled to 8-bit");
    }
  } catch (err) {
    if (err instanceof RefusedImage) throw err;
    throw new RefusedImage(name, `cannot decode: ${err && err.message || err}`);
  }
  const o = orientationOf(meta);
  if (o.note) notes.push(o.note);
  if (o.value !== 1) notes.push(`orientation ${o.value} (${o.source}${meta.rawProfile ? ", raw profile" : ""}) applied`);
  return { ...orient(rgb, h, w, o.value), notes, kind };
}
