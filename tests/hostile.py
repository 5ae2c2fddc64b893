"""Image files that ports get wrong, written byte by byte where Pillow cannot write them.

Used by tests/test_docs_contract.py (each rule of docs/onnx-contract.md against Pillow) and
tests/test_browser.py (the browser page against the Python path on the same files).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def png(samples: np.ndarray, color_type: int, depth: int, *, palette: np.ndarray | None = None,
        trns: bytes | None = None, extra: list[tuple[bytes, bytes]] = (), after_idat: list[tuple[bytes, bytes]] = (),
        interlace: bool = False) -> bytes:
    """A PNG from raw samples [h, w, channels] (or [h, w] / indices) at any bit depth and colour
    type, plain or Adam7-interlaced."""
    a = np.asarray(samples)
    h, w = a.shape[:2]
    ch = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    a = a.reshape(h, w, ch)
    if interlace:
        images = [a[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
        images = [im for im in images if im.size]
    else:
        images = [a]
    rows = []
    for im in images:
        rows += _rows(im.reshape(im.shape[0], -1), depth)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, int(interlace)))
    for kind, data in extra:
        out += _chunk(kind, data)
    if palette is not None:
        out += _chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    if trns is not None:
        out += _chunk(b"tRNS", trns)
    out += _chunk(b"IDAT", zlib.compress(b"".join(rows)))
    for kind, data in after_idat:
        out += _chunk(kind, data)
    return out + _chunk(b"IEND", b"")


def _rows(a: np.ndarray, depth: int) -> list[bytes]:
    rows = []
    for r in a:
        if depth == 16:
            row = r.astype(">u2").tobytes()
        elif depth == 8:
            row = r.astype(np.uint8).tobytes()
        else:  # 1, 2, 4 bits: pack MSB first
            per = 8 // depth
            padded = np.zeros(-(-len(r) // per) * per, np.uint8)
            padded[:len(r)] = r
            g = padded.reshape(-1, per).astype(np.uint16)
            row = bytes(int(sum(int(v) << (8 - depth * (k + 1)) for k, v in enumerate(grp))) for grp in g)
        rows.append(b"\x00" + row)
    return rows


def tiff_exif(orientation: int) -> bytes:
    """A minimal little-endian EXIF/TIFF block holding only the Orientation tag (0x0112)."""
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) \
        + struct.pack("<I", 0)


def raw_profile(data: bytes) -> bytes:
    """ImageMagick's text form of a profile: "\\nexif\\n<len>\\n<hex, 72 a line>\\n"."""
    hexs = data.hex()
    lines = "\n".join(hexs[i:i + 72] for i in range(0, len(hexs), 72))
    return f"\nexif\n{len(data):8d}\n{lines}\n".encode()


def xmp_packet(orientation: int, attribute: bool = True) -> bytes:
    o = (f'tiff:Orientation="{orientation}"' if attribute else "")
    el = "" if attribute else f"<tiff:Orientation>{orientation}</tiff:Orientation>"
    return (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
            b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" ' + o.encode() + b">" + el.encode()
            + b"</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>")


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: a crop of scikit-learn's sample photo (real texture, not noise)."""
    from sklearn.datasets import load_sample_images

    china = load_sample_images().images[0]
    y, x = 60 + 17 * seed, 90 + 23 * seed
    return np.ascontiguousarray(china[y:y + h, x:x + w])


def write_kinds(folder: Path) -> dict[str, Path]:
    """The hostile kinds of issue 25, plus a few more; {name: path}."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo(90, 120)
    grey = rgb.mean(-1)
    files: dict[str, bytes] = {}
    # 16-bit grey: values 0..65535, not multiples of 257
    files["grey16.png"] = png((grey * 257 + np.arange(120)[None, :] % 257).astype(np.uint16), 0, 16)
    # RGB with a tRNS colour key that occurs in the image (Pillow ignores it; a canvas makes it transparent)
    key = rgb[10, 10]
    files["rgb_trns_key.png"] = png(rgb, 2, 8, trns=struct.pack(">HHH", *map(int, key)))
    # grey with a tRNS colour key
    g8 = grey.astype(np.uint8)
    files["grey_trns_key.png"] = png(g8, 0, 8, trns=struct.pack(">H", int(g8[5, 5])))
    # 16-bit RGBA and 16-bit grey+alpha
    alpha16 = (np.linspace(0, 65535, 120)[None, :].repeat(90, 0)).astype(np.uint16)
    files["rgba16.png"] = png(np.dstack([np.minimum(rgb.astype(np.int64) * 257 + 3, 65535), alpha16]), 6, 16)
    files["grey_alpha16.png"] = png(np.dstack([(grey * 257).astype(np.uint16), alpha16[..., None][..., 0]]), 4, 16)
    # 1, 2 and 4-bit grey
    for d in (1, 2, 4):
        files[f"grey{d}bit.png"] = png((grey * ((1 << d) - 1) / 255).round().astype(np.uint8), 0, d)
    # palette with a tRNS alpha table (4-bit indices)
    pal = np.array([[i * 16, 255 - i * 16, (i * 97) % 256] for i in range(16)], np.uint8)
    idx = (grey / 16).astype(np.uint8)
    files["palette4_trns.png"] = png(idx, 3, 4, palette=pal, trns=bytes(range(0, 256, 16)))
    files["interlaced_palette1.png"] = png((idx[:37, :29] > 7).astype(np.uint8), 3, 1, palette=pal[:2], trns=b"\x80",
                                           interlace=True)
    # Adam7-interlaced: 8-bit RGBA and 2-bit grey (odd size: some passes are empty)
    files["interlaced_rgba.png"] = png(np.dstack([rgb, (alpha16 >> 8)]), 6, 8, interlace=True)
    files["interlaced_grey2.png"] = png((grey[:7, :5] / 85).round().astype(np.uint8), 0, 2, interlace=True)
    # orientation: PNG eXIf chunk, PNG zTXt raw profile (ImageMagick), PNG iTXt XMP
    files["png_exif6.png"] = png(rgb, 2, 8, extra=[(b"eXIf", tiff_exif(6))])
    files["png_rawprofile8.png"] = png(rgb, 2, 8, extra=[(b"zTXt", b"Raw profile type exif\x00\x00"
                                                          + zlib.compress(raw_profile(b"Exif\x00\x00" + tiff_exif(8))))])
    files["png_xmp5.png"] = png(rgb, 2, 8, extra=[(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp_packet(5))])
    for name, data in files.items():
        (folder / name).write_bytes(data)
    # JPEG with orientation only in XMP; WebP with EXIF orientation; JPEG with EXIF 3
    im = Image.fromarray(rgb)
    im.save(folder / "jpeg_xmp6.jpg", quality=90, xmp=xmp_packet(6, attribute=False))
    ex = Image.Exif()
    ex[0x0112] = 6
    im.save(folder / "webp_exif6.webp", quality=90, exif=ex.tobytes())
    ex[0x0112] = 3
    im.save(folder / "jpeg_exif3.jpg", quality=90, exif=ex.tobytes())
    im.save(folder / "webp_lossless.webp", lossless=True)
    Image.fromarray(np.dstack([rgb, alpha16[..., None][..., 0] >> 8]).astype(np.uint8), "RGBA").save(folder / "webp_alpha.webp", quality=80)
    return {p.name: p for p in sorted(folder.iterdir())}


def to_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()
