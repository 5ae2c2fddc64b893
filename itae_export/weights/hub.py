"""Fetching official weights: the registry URL into the torch hub cache, or a Hugging Face repository.

Offline, every path ends in one :class:`DownloadError` line that names the URL and says to pass
``--weights PATH``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from itae_export.errors import DownloadError
from itae_export.files import sha256_file
from itae_export.registry import ModelSpec


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def hub_checkpoint_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``, where torch.hub keeps downloaded weights."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_path(spec: ModelSpec) -> Path | None:
    """Where ``spec.url`` lands in the torch hub cache (whether or not it is there yet)."""
    if not spec.url:
        return None
    return hub_checkpoint_dir() / spec.url.rsplit("/", 1)[-1]


def _download_url_to_file(url: str, dst: str) -> None:
    """The one network call for URLs (tests replace it)."""
    import torch.hub

    torch.hub.download_url_to_file(url, dst, progress=True)


def _expected_sha256(url: str) -> str | None:
    """OpenAI's CLIP URLs carry the file's sha256 as a path segment."""
    m = re.search(r"/([0-9a-f]{64})/", url)
    return m.group(1) if m else None


def fetch_official(spec: ModelSpec, download: bool = True) -> tuple[Path, str]:
    """The local path of the official weights of ``spec`` (downloading them if allowed), and the URL."""
    url = spec.url
    if not url:
        raise DownloadError(f"{spec.name} has no official weights URL; pass --weights PATH")
    dst = cached_path(spec)
    if dst.is_file():
        return dst, url
    if not download:
        raise DownloadError(f"official weights for {spec.name} are not in the cache ({dst}) and downloads are off: "
                            f"fetch {url} yourself and pass --weights PATH")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    try:
        _download_url_to_file(url, str(tmp))
    except BaseException as e:  # urllib, socket, ssl and http errors all end here
        tmp.unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        raise DownloadError(f"could not download {url} ({_one_line(e)}); pass --weights PATH with a local copy") from None
    want = _expected_sha256(url)
    if want and sha256_file(tmp) != want:
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"{url}: the downloaded file does not have the expected sha256 {want}; retry or pass --weights PATH")
    os.replace(tmp, dst)
    return dst, url


def fetch_hf(spec: ModelSpec, repo_id: str | None = None, download: bool = True) -> tuple[Path, str]:
    """A snapshot directory of ``repo_id`` (default ``spec.hf_hub_id``) from the Hugging Face hub cache."""
    repo = repo_id or spec.hf_hub_id
    if not repo:
        raise DownloadError(f"{spec.name} has no Hugging Face repository; pass --weights PATH")
    url = f"https://huggingface.co/{repo}"
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo,
            allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json"],
            local_files_only=not download,
        )
    except ImportError:
        raise DownloadError(f"huggingface_hub is not installed, so {url} cannot be fetched; pass --weights PATH") from None
    except Exception as e:  # offline, gated, missing repo: one line
        raise DownloadError(f"could not fetch {url} ({_one_line(e)}); pass --weights PATH with a local copy") from None
    return Path(path), url
