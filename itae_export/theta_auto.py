"""--theta auto: pick theta from the bimodality of the projection norms of calibration images."""

from __future__ import annotations

from typing import Callable

from itae_export.errors import InputError
from itae_export.registry import ModelSpec


def calibrate_theta(spec: ModelSpec, images_dir, *, weights: str | None = None, source: str | None = None,
                    max_images: int = 64, log: Callable[[str], None] = lambda m: None) -> float:
    """The suggested theta of :func:`itae_export.theta.suggest_theta` over up to ``max_images`` images.

    Refuses (InputError) when the norms show no bimodality: a threshold picked from one mode
    would flag arbitrary tokens.
    """
    from itae_export.inspect import compute_norms, load_inspect_model, pick_images
    from itae_export.theta import suggest_theta

    im = load_inspect_model(spec, weights=weights, source=source or "query")
    root, paths = pick_images(images_dir, max_images)
    sample = compute_norms(im, root, paths)
    sug = suggest_theta(sample.norms)
    if not sug.bimodal:
        raise InputError(
            f"--theta auto: the {source or 'query'} norms of {len(sample.paths)} images in {images_dir} show no "
            f"bimodality; pass --theta explicitly (the model's default is {spec.theta:g})"
        )
    log(f"--theta auto: {sug.theta:.4g} (confidence {sug.confidence:.2f}, {sug.method}) from {len(sample.paths)} images")
    return float(sug.theta)
