"""Mask-weighted diffusion loss with optional masked prior preservation.

The student (LoRA) prediction is pulled towards the training target where the mask is high and
towards the teacher (base model, adapter off) prediction where the mask is low. With

    mask_raw  = clamp(mask, 0, 1)                       # raw mask, kept for thresholding
    m         = mask_raw ** gamma                       # only when gamma != 1
    m         = m * (1 - w_min) + w_min                 # only when w_min > 0
    p         = 1 - m                                   # continuous mode (threshold is None)
    p         = [mask_raw < threshold]                  # threshold mode: binary, on the RAW mask,
    m         = m * (1 - p)                             #   and no target weight where p applies

the two terms are region-normalised means, combined additively:

    L_target  = sum(loss * m) / sum(m)
    L_prior   = sum(prior_loss * p) / sum(p) * w_prior
    total     = L_target + L_prior

Normalising each term by its own region (rather than by sum(m + w_prior * p)) makes `w_prior` an
independent knob: 1.0 means the prior term counts as much as the target term whatever the mask
coverage. Per-sample normalisation replaces each ratio by the batch mean of per-sample ratios,
so every sample counts equally whatever its mask area.

Typical weighted-mask tiers with gamma = 0.7 (computed, see tests):

    region       raw    m = raw ** 0.7    p = 1 - m
    face         1.00   1.000             0.000
    body         0.50   0.616             0.384
    hair         0.31   0.441             0.559
    background   0.00   0.000             1.000

The training step enters through :func:`prediction_loss`: one :class:`Weighting` (built once per
run from the config), the maps it made from the step's masks (the step decides the teacher from
the same maps), and per sample the concept's loss weight w_b and the prior's noise gate g_b:

    loss       = (prediction - target) ** 2 * w_b
    prior_loss = (prediction - teacher) ** 2 * w_b * g_b

:func:`masked_prior_loss` is the same reduction for callers that hold unreduced losses and a raw
mask.

Every function here is pure: inputs are never modified in place. All reductions accumulate in
float32 and the returned scalars are float32, whatever the input dtype (1e-8 means nothing in
float16, and a float16 sum over a latent overflows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from modules.config.schema import MaskConfig, PriorConfig

MaskLossLayout = Literal["video", "layered"]

# Weight sums at or below this are treated as "no region" (the term contributes 0, never NaN).
_EPS = 1e-8
_LAYOUTS = ("video", "layered")


@dataclass(frozen=True)
class MaskWeights:
    """Per-element weights derived from a raw mask; both have the mask's shape, in float32.

    target: m, the weight of the loss against the training target.
    prior:  p, the weight of the loss against the teacher (base model) prediction.
    """

    target: Tensor
    prior: Tensor


@dataclass(frozen=True)
class LossBreakdown:
    """The masked loss and its parts; every field is a float32 scalar tensor.

    total:  L_target + L_prior, differentiable with respect to `loss` and `prior_loss`.
    target: L_target = sum(loss * m) / sum(m) (or the per-sample version).
    prior:  L_prior, already multiplied by `prior_weight`.
    target_weight_mean: mean(m) over all elements, detached, for logging (1 without a mask).
    prior_weight_mean:  mean(p) over all elements, detached, for logging (0 without a mask).
        It is the prior map's mean even when `prior_weight` is 0 and the map goes unused.
    """

    total: Tensor
    target: Tensor
    prior: Tensor
    target_weight_mean: Tensor = field(default_factory=lambda: torch.ones(()))
    prior_weight_mean: Tensor = field(default_factory=lambda: torch.zeros(()))


@dataclass(frozen=True)
class Weighting:
    """How a raw mask becomes the two weight maps and how each term is normalised: one
    description per run, built from the config by :meth:`of`, used by the step (the teacher's
    samples and the loss), the data checks and the UI's preview alike.

    gamma, min_weight, prior_threshold: :func:`process_masks`.
    normalize_per_sample: each sample's own weighted mean, then the batch mean
    (:func:`masked_prior_loss`).
    """

    gamma: float = 1.0
    min_weight: float = 0.0
    prior_threshold: float | None = None
    normalize_per_sample: bool = False

    def __post_init__(self) -> None:
        _check_mask_settings(self.gamma, self.min_weight)

    @classmethod
    def of(cls, mask: MaskConfig, prior: PriorConfig) -> Weighting:
        """The weighting of a config's ``mask`` and ``prior`` sections."""
        return cls(
            gamma=mask.gamma,
            min_weight=mask.min_weight,
            prior_threshold=prior.threshold,
            normalize_per_sample=mask.normalize_per_sample,
        )

    def maps(self, mask: Tensor) -> MaskWeights:
        """m and p of a raw mask of any shape (:func:`process_masks`)."""
        return process_masks(
            mask,
            gamma=self.gamma,
            min_weight=self.min_weight,
            prior_threshold=self.prior_threshold,
        )


def process_masks(
    mask: Tensor,
    *,
    gamma: float = 1.0,
    min_weight: float = 0.0,
    prior_threshold: float | None = None,
) -> MaskWeights:
    """Turn a raw mask into the target map m and the prior map p, elementwise.

        mask_raw = clamp(mask, 0, 1)
        m = mask_raw ** gamma                     (skipped when gamma == 1)
        m = m * (1 - min_weight) + min_weight     (skipped when min_weight == 0)
        p = 1 - m

    With `prior_threshold` set (threshold mode), p is binarised on the RAW mask, before gamma and
    min_weight, and the overlap is removed from the target map so that every element learns
    either from the target or from the teacher, never both:

        p = (mask_raw < prior_threshold)
        m = m * (1 - p)

    Any shape is accepted; both maps have the mask's shape and are float32 (a bool or half mask
    is upcast first, so the maps are the same whatever the mask's dtype). Raises ValueError for
    gamma <= 0 or min_weight outside [0, 1].
    """
    _check_mask_settings(gamma, min_weight)
    mask_raw = mask.to(torch.float32).clamp(0.0, 1.0)  # clamp returns a new tensor

    target = mask_raw
    if gamma != 1.0:
        target = target**gamma
    if min_weight > 0:
        target = target * (1.0 - min_weight) + min_weight
    prior = 1.0 - target

    if prior_threshold is not None:
        prior = (mask_raw < prior_threshold).to(torch.float32)
        target = target * (1.0 - prior)
    return MaskWeights(target=target, prior=prior)


def masked_prior_loss(
    loss: Tensor,
    mask: Tensor | None,
    *,
    prior_loss: Tensor | None = None,
    prior_weight: float = 0.0,
    gamma: float = 1.0,
    min_weight: float = 0.0,
    prior_threshold: float | None = None,
    normalize_per_sample: bool = False,
    layout: str = "video",
    drop_base_frame: bool = False,
) -> LossBreakdown:
    """Reduce unreduced losses to L_target + L_prior with masks processed by `process_masks`.

    Global normalisation (default), with m and p broadcast to the loss's shape:

        L_target = sum(loss * m) / sum(m)                       (0 if sum(m) < 1e-8)
        L_prior  = sum(prior_loss * p) / sum(p) * prior_weight  (0 if sum(p) < 1e-8)

    Per-sample normalisation (`normalize_per_sample=True`), sums over every non-batch dim:

        L_target = mean_b( sum_b(loss * m) / sum_b(m) )

    where a sample with sum_b(m) <= 1e-8 contributes 0 but still counts in the batch mean;
    L_prior likewise on prior_loss and p, then times prior_weight (and 0 if sum(p) over the
    whole batch is < 1e-8). L_prior is 0 when prior_weight == 0 or prior_loss is None.
    `mask=None` means no masking: total = target = mean(loss), prior = 0.

    Shapes:
        layout "video":   loss and prior_loss (B, C, F, H, W), or (B, C, H, W) for images;
                          mask (B, F, H, W) or (B, 1, F, H, W), or (B, 1, H, W) for images.
                          `drop_base_frame` is ignored.
        layout "layered": loss and prior_loss (B, L, C, H, W), layers on dim 1;
                          mask (B, 1, L', H, W) or (B, L', H, W), layers on dim 2 after the
                          unsqueeze. With `drop_base_frame` the mask's layer 0 (the base image)
                          is dropped, so L' = L + 1; otherwise L' = L.
    prior_loss must have the loss's shape. Mismatches raise ValueError naming both shapes.

    The loss is upcast to float32 before it is weighted (the design multiplies in the loss's
    dtype and only sums in float32); the results agree up to half-precision rounding, and a
    float16 product cannot overflow. Returns float32 scalars; gradients flow from `total` into
    `loss` and `prior_loss`, also when a term is 0 because its region is empty (the zero stays
    attached to the graph).
    """
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if prior_loss is not None and prior_loss.shape != loss.shape:
        raise ValueError(
            f"prior_loss must have the loss's shape: prior_loss={tuple(prior_loss.shape)} "
            f"loss={tuple(loss.shape)}"
        )

    if mask is None:
        mean = loss.to(torch.float32).mean()
        zero = mean.new_zeros(())
        return LossBreakdown(
            total=mean,
            target=mean,
            prior=zero,
            target_weight_mean=mean.new_ones(()),
            prior_weight_mean=zero,
        )

    loss5 = _loss_as_5d(loss, layout)
    mask5 = _mask_like(mask, loss5, layout, drop_base_frame, loss.shape)
    weights = Weighting(gamma, min_weight, prior_threshold, normalize_per_sample).maps(mask5)
    prior5 = None if prior_loss is None else _loss_as_5d(prior_loss, layout).to(loss5.device)
    return _reduce(loss5, prior5, weights, prior_weight, normalize_per_sample)


def prediction_loss(
    prediction: Tensor,
    target: Tensor,
    maps: MaskWeights | None,
    weighting: Weighting,
    *,
    teacher: Tensor | None = None,
    prior_weight: float = 0.0,
    sample_weight: Tensor | None = None,
    prior_gate: Tensor | None = None,
    layout: str = "video",
    drop_base_frame: bool = False,
) -> LossBreakdown:
    """The step's loss from the predictions, reduced as :func:`masked_prior_loss` does:

        loss       = (prediction - target) ** 2 * w_b
        prior_loss = (prediction - teacher) ** 2 * w_b * g_b    (only with a teacher and
                                                                 prior_weight > 0)

    w_b = ``sample_weight`` (B,): the sample's concept loss weight, on both terms (1 when None).
    g_b = ``prior_gate`` (B,), bool or float: 1 where the sample's noise level lies in the
    prior's range, 0 elsewhere (1 when None); a gated-off sample adds nothing to the prior
    term's sum but its prior map still counts in the normalisation, as it always did.

    ``maps``: ``weighting.maps(masks)`` of the step's masks, (B, 1, [F,] h, w) like the masks
    (``drop_base_frame`` and ``layout`` as in :func:`masked_prior_loss`); None means no masking:
    the plain mean of ``loss``. Only ``weighting.normalize_per_sample`` is read here: the maps
    already hold the rest. ``prediction``, ``target`` and ``teacher`` have one shape, (B, C, h, w)
    or (B, C, F, h, w) (layered: (B, L, C, h, w)); each is upcast to float32 first.
    """
    if teacher is not None and teacher.shape != prediction.shape:
        raise ValueError(
            f"teacher must have the prediction's shape: teacher={tuple(teacher.shape)} "
            f"prediction={tuple(prediction.shape)}"
        )
    prediction = prediction.float()
    shape = (-1,) + (1,) * (prediction.ndim - 1)  # (B,) -> (B, 1, ..., 1)

    def per_sample(values: Tensor, factor: Tensor | None) -> Tensor:
        if factor is None:
            return values
        return values * factor.to(prediction.device, torch.float32).view(shape)

    loss = per_sample(F.mse_loss(prediction, target.float(), reduction="none"), sample_weight)
    prior_loss = None
    if teacher is not None and prior_weight > 0:
        prior_loss = F.mse_loss(prediction, teacher.float(), reduction="none")
        prior_loss = per_sample(per_sample(prior_loss, sample_weight), prior_gate)
    if maps is None:
        return masked_prior_loss(loss, None, layout=layout)
    loss5 = _loss_as_5d(loss, layout)
    weights = MaskWeights(
        target=_mask_like(maps.target, loss5, layout, drop_base_frame, loss.shape),
        prior=_mask_like(maps.prior, loss5, layout, drop_base_frame, loss.shape),
    )
    prior5 = None if prior_loss is None else _loss_as_5d(prior_loss, layout)
    return _reduce(loss5, prior5, weights, prior_weight, weighting.normalize_per_sample)


def _reduce(
    loss5: Tensor,
    prior5: Tensor | None,
    weights: MaskWeights,
    prior_weight: float,
    per_sample: bool,
) -> LossBreakdown:
    """The two region-normalised terms of 5-D float32 losses with maps that broadcast to them."""
    # expand_as makes views: the processed maps are computed once at mask resolution.
    target_map = weights.target.expand_as(loss5)
    prior_map = weights.prior.expand_as(loss5)

    target_term = _weighted_mean(loss5, target_map, per_sample)

    if prior_weight > 0 and prior5 is not None:
        prior_mean = _weighted_mean(prior5, prior_map, per_sample)
        # An empty prior region (mask all ones, or threshold never met) contributes exactly 0.
        has_prior = prior_map.sum(dtype=torch.float32) >= _EPS
        prior_term = torch.where(has_prior, prior_mean, torch.zeros_like(prior_mean))
        prior_term = prior_term * prior_weight
    else:
        prior_term = target_term.new_zeros(())

    return LossBreakdown(
        total=target_term + prior_term,
        target=target_term,
        prior=prior_term,
        target_weight_mean=weights.target.mean(dtype=torch.float32).detach(),
        prior_weight_mean=weights.prior.mean(dtype=torch.float32).detach(),
    )


def _weighted_mean(values: Tensor, weights: Tensor, per_sample: bool) -> Tensor:
    """sum(values * weights) / sum(weights) in float32, globally or per sample then batch mean.

    Empty regions give 0, not NaN: globally when sum(weights) < 1e-8, per sample when a
    sample's sum <= 1e-8 (it still counts in the batch mean). torch.where instead of a Python
    branch keeps the zero attached to the graph and avoids a device sync.
    """
    weighted = values * weights
    if per_sample:
        dims = tuple(range(1, values.ndim))  # every non-batch dim
        sums = weighted.sum(dim=dims, dtype=torch.float32)  # (B,)
        weight_sums = weights.sum(dim=dims, dtype=torch.float32)  # (B,)
        per_sample_means = torch.where(
            weight_sums > _EPS, sums / weight_sums.clamp_min(_EPS), torch.zeros_like(sums)
        )
        return per_sample_means.mean()

    total = weighted.sum(dtype=torch.float32)
    weight_sum = weights.sum(dtype=torch.float32)
    return torch.where(
        weight_sum < _EPS, torch.zeros_like(total), total / weight_sum.clamp_min(_EPS)
    )


def _mask_like(
    mask: Tensor, loss5: Tensor, layout: str, drop_base_frame: bool, loss_shape: torch.Size
) -> Tensor:
    """A mask (or a map made from one) in a shape that broadcasts against the 5-D loss.

    video:   mask (B, F, H, W) or (B, 1, F, H, W) -> (B, 1, F, H, W) for loss (B, C, F, H, W).
    layered: mask (B, 1, L', H, W) -> (B, L, 1, H, W) for loss (B, L, C, H, W), after dropping
             layer 0 when drop_base_frame.
    The mask keeps its own dtype here; process_masks upcasts it. ``loss_shape``: the loss's
    shape as the caller gave it, for the error message.
    """
    given = f"mask={tuple(mask.shape)} loss={tuple(loss_shape)}"
    if mask.ndim == 4:
        mask = mask.unsqueeze(1)  # (B, F, H, W) -> (B, 1, F, H, W)
    elif mask.ndim != 5:
        raise ValueError(f"Expected mask to be 4D or 5D, got {given}")
    mask = mask.to(loss5.device)

    if layout == "video":
        if (
            mask.shape[0] != loss5.shape[0]
            or mask.shape[1] not in (1, loss5.shape[1])
            or mask.shape[2:] != loss5.shape[2:]
        ):
            raise ValueError(f"Shape mismatch: {given} (mask needs (B, F, H, W) of the loss)")
        return mask

    if drop_base_frame:
        mask = mask[:, :, 1:]  # (B, 1, L+1, H, W) -> (B, 1, L, H, W); a view, not in place
    if (
        mask.shape[0] != loss5.shape[0]
        or mask.shape[1] not in (1, loss5.shape[2])
        or mask.shape[2] != loss5.shape[1]
        or mask.shape[3:] != loss5.shape[3:]
    ):
        layers = "L + 1 layers (base first)" if drop_base_frame else "L layers"
        raise ValueError(
            f"Shape mismatch for layered: {given} (loss is (B, L, C, H, W); the mask needs "
            f"{layers} with drop_base_frame={drop_base_frame})"
        )
    return mask.permute(0, 2, 1, 3, 4)  # (B, 1, L, H, W) -> (B, L, 1, H, W)


def _loss_as_5d(loss: Tensor, layout: str) -> Tensor:
    """(B, C, H, W) -> (B, C, 1, H, W) for video; 5-D passes through; float32 either way."""
    if loss.ndim == 4:
        if layout != "video":
            raise ValueError(
                f"4D loss is only supported for layout='video', got loss={tuple(loss.shape)} "
                f"with layout={layout!r}"
            )
        loss = loss.unsqueeze(2)  # (B, C, H, W) -> (B, C, 1, H, W)
    elif loss.ndim != 5:
        raise ValueError(f"Expected loss to be 4D or 5D, got loss={tuple(loss.shape)}")
    return loss.to(torch.float32)


def _check_mask_settings(gamma: float, min_weight: float) -> None:
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not 0.0 <= min_weight <= 1.0:
        raise ValueError(f"min_weight must be in [0, 1], got {min_weight}")
