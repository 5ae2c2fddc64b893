"""The CLIP tokenizer (byte-level BPE, 49,408 tokens, 77 positions), read from the files shipped
beside an exported text tower: ``vocab.json`` (token -> id) and ``merges.txt`` (one merge per line,
by rank). The rules are written out in docs/search.md ("Tokenizer"), so that another runtime can
reproduce them; this module is the reference.

1. Clean: ``ftfy.fix_text``, HTML-unescape twice, strip, collapse whitespace runs to one space,
   lower-case.
2. Split with the pattern :data:`PATTERN` (Unicode letter/number classes, case-insensitive).
3. Each piece: its UTF-8 bytes mapped to characters by :func:`bytes_to_unicode`; ``</w>`` appended
   to the last character; the lowest-ranked adjacent pair merged until no pair is in the merges.
4. ids = [SOT] + ids of the pieces + [EOT], truncated to 77 with EOT forced last, zero-padded.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from itae_export.errors import InputError
from itae_export.files import atomic_write_bytes

CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
PATTERN = SOT + "|" + EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
N_MERGES = 49152 - 256 - 2  # merges used by CLIP: 48,894 lines after the header of the upstream file


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character: printable Latin-1 bytes map to themselves, the other 68 bytes
    to U+0100 onwards, in byte order (OpenAI's GPT-2/CLIP table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def upstream_merges_file() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI's file), found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the CLIP vocabulary comes from open_clip's wheel: pip install --no-deps open-clip-torch")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise InputError(f"{path}: missing from the installed open_clip")
    return path


def write_tokenizer_files(out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> list[Path]:
    """vocab.json and merges.txt in ``out_dir``, derived from the upstream merges file."""
    source = Path(source) if source else upstream_merges_file()
    lines = gzip.open(source).read().decode("utf-8").split("\n")[1:N_MERGES + 1]
    merges = [tuple(m.split()) for m in lines]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + [SOT, EOT]
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / MERGES_FILE, ("\n".join(" ".join(m) for m in merges) + "\n").encode("utf-8"))
    atomic_write_bytes(out_dir / VOCAB_FILE, json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False).encode("utf-8"))
    return [out_dir / VOCAB_FILE, out_dir / MERGES_FILE]


class ClipTokenizer:
    """Tokenise like open_clip's SimpleTokenizer (clean='lower'), from vocab.json + merges.txt."""

    def __init__(self, folder: str | os.PathLike, context_length: int = CONTEXT_LENGTH):
        import regex

        folder = Path(folder)
        try:
            self.encoder: dict[str, int] = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
            merges = (folder / MERGES_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as e:
            raise InputError(f"{folder}: the tokenizer files are missing ({Path(e.filename).name})") from None
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges) if m}
        self.byte_encoder = bytes_to_unicode()
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self.context_length = context_length
        self.pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self.cache = {SOT: SOT, EOT: EOT}

    @staticmethod
    def clean(text: str) -> str:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).strip().lower()

    def bpe(self, piece: str) -> list[str]:
        if piece in self.cache:
            return self.cache[piece].split(" ")
        word = tuple(piece[:-1]) + (piece[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[piece] = " ".join(word)
        return list(word)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pattern.findall(self.clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece))
        return ids

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        """int64 [n, 77]: SOT, tokens, EOT (forced last when truncated), zeros."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), np.int64)
        for r, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.eot
            out[r, :len(ids)] = ids
        return out
