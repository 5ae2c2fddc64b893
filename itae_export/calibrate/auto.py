"""--theta auto: pick theta from the bimodality of the projection norms of calibration images."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from itae_export.calibrate.inspection import InspectModel, artifact_mask_np, compute_norms, pick_items
from itae_export.calibrate.theta import suggest_theta
from itae_export.cluster.artifacts import artifact_stats, counts_from_masks, report_lines
from itae_export.errors import OptionError
from itae_export.model.itae import inject_itae
from itae_export.registry import ITAEOptions, ModelSpec, parse_theta
from itae_export.weights import checkpoints


def calibrate_theta(spec: ModelSpec, images_dir, model, *, source: str | None = None, max_images: int = 64,
                    log: Callable[[str], None] = lambda m: None) -> float | None:
    """The suggested theta of :func:`itae_export.calibrate.theta.suggest_theta` over up to ``max_images`` images,
    or None when the norms show no bimodality: these images show no artifacts to attenuate, and a
    threshold picked inside one mode would flag ordinary tokens (the caller then turns ITAE off).

    ``model``: the loaded VisionTransformer; ITAE is (re-)injected into it for ``source``.
    """

    src = source or "query"
    options = ITAEOptions.for_model(spec, source=src)
    inject_itae(model, options)
    location, items = pick_items(images_dir, max_images)  # a folder, a path list or tars, like the command's input
    sample = compute_norms(InspectModel(model.eval(), spec, options, "the loaded model"), Path(location), items)
    sug = suggest_theta(sample.norms)
    if not sug.bimodal:
        log(f"--theta auto: the {src} norms of the {len(sample.paths)} images of {images_dir} show no bimodality "
            f"(confidence {sug.confidence:.2f}): no artifacts to attenuate, so ITAE is off (as --no-itae); pass "
            "--theta to force one (docs/guide.md, 'Theta: when ITAE applies, and when not')")
        return None
    log(f"--theta auto: {sug.theta:.4g} (confidence {sug.confidence:.2f}, {sug.method}) from {len(sample.paths)} images")
    mask = artifact_mask_np(sample.norms, sug.theta, options.group)
    stats = artifact_stats(counts_from_masks(mask), mask.shape[1], theta=sug.theta)
    for line in report_lines(stats, "calibration images"):
        log(line)
    return float(sug.theta)


def load_and_calibrate(spec: ModelSpec, images_dir, *, weights: str | None = None, pos_rule: str | None = None,
                       source: str | None = None,
                       log: Callable[[str], None] = lambda m: None) -> tuple[float | None, dict]:
    """(theta or None when the norms are unimodal, keyword arguments for
    :func:`itae_export.onnx.export.export_onnx`): the checkpoint is read once, for the calibration and
    for the export that follows."""

    log(f"loading weights for {spec.name} ...")
    model, loaded = checkpoints.load_model(spec, None, weights=weights, pos_rule=pos_rule)
    theta = calibrate_theta(spec, images_dir, model, source=source, log=log)
    return theta, {"model": model, "weights_info": loaded.info()}


def resolve_options(spec: ModelSpec, *, theta: float | str | None = None, source: str | None = None,
                    group: str | None = None, strategy: str | None = None, rows: str | None = None,
                    lsa: bool | None = None, enabled: bool = True, calibration_images=None,
                    weights: str | None = None, pos_rule: str | None = None,
                    log: Callable[[str], None] = lambda m: None) -> tuple[ITAEOptions, dict]:
    """(ITAE options for the flags, keyword arguments for the export). ``theta="auto"`` calibrates on
    ``calibration_images``, reading the checkpoint once; the loaded model is handed on to the export."""
    theta = parse_theta(theta, allow_auto=True)
    preloaded: dict = {}
    if theta == "auto":
        if calibration_images is None:
            raise OptionError("--theta auto needs calibration images (--calibration-images INPUT)")
        theta, preloaded = load_and_calibrate(spec, calibration_images, weights=weights, pos_rule=pos_rule,
                                              source=source, log=log)
        enabled = enabled and theta is not None  # unimodal norms: the unpatched model (calibrate_theta said so)
    elif theta is None and spec.theta_note and enabled:
        log(f"warning: {spec.name}: {spec.theta_note}")
    options = ITAEOptions.for_model(spec, theta=theta, source=source, group=group, strategy=strategy, rows=rows,
                                    lsa=lsa, enabled=enabled)
    return options, preloaded
