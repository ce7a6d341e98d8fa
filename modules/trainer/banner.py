"""The start-of-run banner (design §4.6): what the loss will do, in words, before the first step."""

from __future__ import annotations

from modules.config.schema import TrainConfig

RULE = "=" * 60
THIN = "-" * 60


def banner_lines(config: TrainConfig, cache_hint: str | None = None) -> list[tuple[str, str]]:
    """``(level, text)`` lines; level is "info" or "warning"."""
    mask, prior = config.mask, config.prior
    prior_concepts = sum(c.type == "prior_prediction" for c in config.data.concepts)
    lines: list[tuple[str, str]] = []
    info = lambda text: lines.append(("info", text))  # noqa: E731
    warn = lambda text: lines.append(("warning", text))  # noqa: E731
    if not mask.enabled:
        info(f"Masked training off: plain loss over the whole image ({config.model.family}).")
        if prior_concepts:
            info(f"{prior_concepts} prior-prediction concept(s): their target is the base model.")
        return lines
    info(RULE)
    if prior.weight > 0:
        info("MASKED PRIOR PRESERVATION TRAINING ENABLED")
    else:
        info("MASK-WEIGHTED LOSS TRAINING ENABLED")
    info(RULE)
    info(f"  mask.min_weight: {mask.min_weight}")
    info(f"  mask.gamma: {mask.gamma}")
    info(f"  mask.unmasked_probability: {mask.unmasked_probability}")
    if prior.weight > 0:
        info(f"  prior.weight: {prior.weight}")
        mode = "continuous" if prior.threshold is None else f"threshold < {prior.threshold}"
        info(f"  prior mode: {mode}")
        if prior.schedule != "constant":
            info(f"  prior.schedule: {prior.schedule} over {prior.schedule_share:.0%} of the steps")
        if prior.gated:
            info(
                f"  prior noise levels: {prior.noise_min}-{prior.noise_max} (teacher skipped "
                "outside)"
            )
        info(f"  mask.normalize_per_sample: {mask.normalize_per_sample}")
        info(THIN)
        info("PRIOR PRESERVATION: Unmasked regions will match base model.")
        info("                    Expect ~1.3-1.7x training time.")
        if mask.min_weight > 0:
            warn(f"  NOTE: mask.min_weight={mask.min_weight} reduces prior effect.")
            warn("        Recommend mask.min_weight 0.0 with prior preservation.")
    if prior_concepts:
        info(f"  prior-prediction concepts: {prior_concepts} (target = base model prediction)")
    info(THIN)
    info("Masks are cached apart from the latents: an edited mask re-encodes no image.")
    if cache_hint:
        info(cache_hint)
    info(RULE)
    return lines
