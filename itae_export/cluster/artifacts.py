"""How many tokens ITAE flagged, per image and per run, and the sanity rule on that share.

The paper (Sec. 3, Fig. 2) describes artifacts as a *few* high-norm tokens per image; Darcet et
al. ("Vision Transformers Need Registers", ICLR 2024), whom it follows, measure them at about 2% of
the tokens of the large DINOv2 models. A theta in the body of a unimodal histogram flags ordinary
patches instead: tens of tokens per image (22% at theta 2.5 on ViT-S/14 photos), and the CLS token
is then cut off from a large part of the image. :data:`WARN_SHARE`, 2.5 times the 2% of the
literature, is the line beyond which every command that reports the counts warns in one line.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TYPICAL_SHARE = 0.02  # share of the tokens that are high-norm artifacts (Darcet et al., Sec. 2)
WARN_SHARE = 0.05  # flagged share of the candidate tokens above which the counts look like ordinary patches
NO_MASK = -1  # an image whose graph has no artifact_mask output (EmbedResult.artifact_counts)


def artifact_stats(counts: Sequence[int] | np.ndarray, candidate_tokens: int, *, theta: float | None = None,
                   enabled: bool = True) -> dict:
    """The statistics of per-image flagged-token counts (``candidate_tokens`` per image: registers and patches).

    ``counts`` of :data:`NO_MASK` (-1) mean that the graph gave no mask for the image: with any of
    them, the block says so and holds no numbers."""
    c = np.asarray(counts, dtype=np.int64).ravel()
    record: dict = {"images": int(c.size), "candidate_tokens_per_image": int(candidate_tokens),
                    "theta": None if theta is None else float(theta), "itae_enabled": bool(enabled),
                    "warn_share": WARN_SHARE}
    if c.size and (c < 0).any():
        record.update(available=False, reason=f"the graph has no artifact_mask output for {int((c < 0).sum())} "
                                               f"of {c.size} images")
        return record
    if c.size and (c > candidate_tokens).any():
        raise ValueError(f"a count of {int(c.max())} flagged tokens exceeds the {candidate_tokens} candidate tokens")
    n = max(c.size, 1)
    share = float(c.sum()) / (n * candidate_tokens) if candidate_tokens else 0.0
    record.update(
        available=True,
        mean=float(c.mean()) if c.size else 0.0,
        median=float(np.median(c)) if c.size else 0.0,
        p99=float(np.percentile(c, 99)) if c.size else 0.0,
        max=int(c.max()) if c.size else 0,
        images_with_any=int((c > 0).sum()),
        share_images_with_any=float((c > 0).sum()) / n if c.size else 0.0,
        tokens_flagged=int(c.sum()),
        share_tokens_flagged=share,
    )
    record["warning"] = sanity_warning(record)
    return record


def sanity_warning(stats: dict) -> str | None:
    """One line when the flagged share is far above what artifacts are (:data:`WARN_SHARE`), else None."""
    if not stats.get("available") or stats["share_tokens_flagged"] <= WARN_SHARE:
        return None
    theta = "" if stats.get("theta") is None else f" at theta {stats['theta']:g}"
    return (f"warning: ITAE flagged {100 * stats['share_tokens_flagged']:.1f}% of the candidate tokens{theta} "
            f"(mean {stats['mean']:.1f} of {stats['candidate_tokens_per_image']} per image, in "
            f"{stats['images_with_any']} of {stats['images']} images); artifacts are a few tokens per image "
            f"(above {100 * WARN_SHARE:g}% these are ordinary patches): run itae-inspect to choose a theta, "
            "or use --no-itae")


def format_stats(stats: dict, what: str = "images") -> str:
    """One line: the counts per image."""
    if not stats.get("available"):
        return f"Artifacts: not counted ({stats.get('reason', 'no mask')})"
    if not stats.get("itae_enabled", True):
        return "Artifacts: ITAE is off (--no-itae), no token was attenuated"
    return (f"Artifacts{'' if stats.get('theta') is None else ' at theta ' + format(stats['theta'], 'g')}: "
            f"{stats['mean']:.2f} flagged tokens per image (median {stats['median']:g}, p99 {stats['p99']:g}, "
            f"max {stats['max']}) of {stats['candidate_tokens_per_image']}; {stats['images_with_any']} of "
            f"{stats['images']} {what} with any; {100 * stats['share_tokens_flagged']:.2f}% of the candidate tokens")


def report_lines(stats: dict, what: str = "images") -> list[str]:
    """The statistics line and, when the sanity rule fires, its warning."""
    return [format_stats(stats, what)] + ([stats["warning"]] if stats.get("warning") else [])


def counts_from_masks(masks: np.ndarray) -> np.ndarray:
    """Per-image flagged-token counts of artifact masks ``[n, T-1]``."""
    return np.asarray(masks, bool).reshape(len(masks), -1).sum(1).astype(np.int64)


def cluster_artifacts(res, manifest: dict) -> dict:
    """summary.json's ``artifacts`` block of an itae-cluster run, from the embed stage's per-image
    counts (``EmbedResult.artifact_counts``, aligned with its paths), with the most-flagged images."""
    itae = manifest.get("itae") or {}
    candidates = int(manifest.get("num_tokens", 1)) - 1
    counts = getattr(res, "artifact_counts", None)
    if counts is None:
        return {"available": False, "reason": "the embed stage recorded no per-image counts",
                "candidate_tokens_per_image": candidates, "warn_share": WARN_SHARE}
    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) != len(res.paths):
        return {"available": False, "reason": f"{len(counts)} counts for {len(res.paths)} images",
                "candidate_tokens_per_image": candidates, "warn_share": WARN_SHARE}
    stats = artifact_stats(counts, candidates, theta=itae.get("theta"), enabled=bool(itae.get("enabled", True)))
    if stats["available"]:
        order = np.argsort(-counts, kind="stable")[:TOP_IMAGES]
        stats["most_flagged"] = [{"path": res.paths[i], "tokens": int(counts[i])} for i in order if counts[i] > 0]
    return stats


TOP_IMAGES = 8  # most-flagged images listed in summary.json and shown in the report
