"""Tests for modules/loss/masked_loss.py: hand-computed values plus a randomized reference check.

Shapes in the hand-computed tests are tiny, e.g. loss (B=1, C=1, H=1, W=4), so the expected
numbers can be checked with pencil and paper.
"""

import dataclasses
import itertools
import random

import pytest
import torch

from modules.loss import (
    LossBreakdown,
    MaskWeights,
    Weighting,
    masked_prior_loss,
    prediction_loss,
    process_masks,
)


def _row(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (1, 1, 1, W) tensor: one image, one channel, one row."""
    return torch.tensor(values, dtype=dtype).reshape(1, 1, 1, -1)


def _fields(breakdown: LossBreakdown) -> list[torch.Tensor]:
    return [getattr(breakdown, field.name) for field in dataclasses.fields(breakdown)]


def _scalar(value: torch.Tensor) -> float:
    assert value.ndim == 0
    assert value.dtype == torch.float32
    return float(value.detach())


# --------------------------------------------------------------------------- process_masks


def test_process_masks_defaults_clamp_and_complement():
    mask = torch.tensor([[-0.5, 0.0, 0.25], [0.75, 1.0, 1.5]])
    weights = process_masks(mask)
    assert isinstance(weights, MaskWeights)
    assert weights.target.shape == mask.shape
    assert weights.target.dtype == torch.float32
    assert weights.prior.dtype == torch.float32
    torch.testing.assert_close(weights.target, torch.tensor([[0.0, 0.0, 0.25], [0.75, 1.0, 1.0]]))
    torch.testing.assert_close(weights.prior, 1.0 - weights.target)


def test_process_masks_tier_table_gamma_07():
    # Design section 10: face 1.0, body 0.5, hair 0.31, background 0.0 with gamma 0.7.
    # The design's table says 0.47 / 0.53 for hair, but 0.31 ** 0.7 = 0.4405; the formula wins.
    raw = torch.tensor([1.0, 0.5, 0.31, 0.0])
    weights = process_masks(raw, gamma=0.7)
    expected_target = torch.tensor([1.0, 0.5**0.7, 0.31**0.7, 0.0])
    torch.testing.assert_close(weights.target, expected_target)
    torch.testing.assert_close(weights.prior, 1.0 - expected_target)
    assert weights.target.tolist() == pytest.approx([1.0, 0.6156, 0.4405, 0.0], abs=1e-4)
    assert weights.prior.tolist() == pytest.approx([0.0, 0.3844, 0.5595, 1.0], abs=1e-4)


def test_process_masks_min_weight_floor_and_coupled_prior():
    raw = torch.tensor([0.0, 0.5, 1.0])
    weights = process_masks(raw, gamma=2.0, min_weight=0.2)
    # m = raw ** 2 * 0.8 + 0.2 = [0.2, 0.4, 1.0]; p = 1 - m.
    torch.testing.assert_close(weights.target, torch.tensor([0.2, 0.4, 1.0]))
    torch.testing.assert_close(weights.prior, torch.tensor([0.8, 0.6, 0.0]))


def test_process_masks_threshold_binarizes_on_raw_mask_and_removes_overlap():
    raw = torch.tensor([1.0, 0.5, 0.12, 0.05, 0.0])
    # gamma 3 pushes raw 0.12 to 0.0017 (< 0.1) and min_weight lifts raw 0.05 to ~0.5 (> 0.1):
    # neither changes the prior map, which is decided on the raw mask only.
    weights = process_masks(raw, gamma=3.0, min_weight=0.5, prior_threshold=0.1)
    torch.testing.assert_close(weights.prior, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
    processed = raw**3.0 * 0.5 + 0.5
    expected_target = torch.tensor([1.0, processed[1], processed[2], 0.0, 0.0])
    torch.testing.assert_close(weights.target, expected_target)
    assert torch.all(weights.target * weights.prior == 0)  # no element in both regions


def test_process_masks_threshold_is_strict():
    weights = process_masks(torch.tensor([0.25, 0.5, 0.75]), prior_threshold=0.5)
    assert weights.prior.tolist() == [1.0, 0.0, 0.0]
    assert weights.target.tolist() == [0.0, 0.5, 0.75]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.bool])
def test_process_masks_returns_float32(dtype):
    mask = torch.tensor([0.0, 1.0, 1.0]).to(dtype)
    weights = process_masks(mask, gamma=0.7)
    assert weights.target.dtype == torch.float32
    assert weights.prior.dtype == torch.float32
    assert weights.target.tolist() == [0.0, 1.0, 1.0]


def test_process_masks_does_not_modify_input():
    mask = torch.tensor([-0.5, 0.3, 0.8, 1.5])
    before = mask.clone()
    process_masks(mask, gamma=0.7, min_weight=0.1)
    process_masks(mask, prior_threshold=0.5)
    assert torch.equal(mask, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"min_weight": -0.1}, "min_weight"),
        ({"min_weight": 1.5}, "min_weight"),
    ],
)
def test_process_masks_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        process_masks(torch.ones(2), **kwargs)


# --------------------------------------------------------------------------- shapes


def test_image_loss_4d_hand_computed():
    loss = _row(1.0, 2.0, 3.0, 4.0)  # (1, 1, 1, 4) read as (B, C, H, W)
    mask = _row(1.0, 0.5, 0.0, 0.0)  # (1, 1, 1, 4) read as (B, 1, H, W)
    prior_loss = _row(10.0, 20.0, 30.0, 40.0)
    out = masked_prior_loss(loss, mask, prior_loss=prior_loss, prior_weight=0.5)
    # L_target = (1*1 + 2*0.5) / 1.5; L_prior = (20*0.5 + 30 + 40) / 2.5 * 0.5 = 16.
    assert _scalar(out.target) == pytest.approx(4.0 / 3.0)
    assert _scalar(out.prior) == pytest.approx(16.0)
    assert _scalar(out.total) == pytest.approx(16.0 + 4.0 / 3.0)
    assert _scalar(out.target_weight_mean) == pytest.approx(0.375)
    assert _scalar(out.prior_weight_mean) == pytest.approx(0.625)


def test_mask_broadcasts_over_channels_and_counts_them_in_the_weight_sum():
    loss = torch.cat([_row(1.0, 2.0, 3.0, 4.0), _row(2.0, 4.0, 6.0, 8.0)], dim=1)  # C = 2
    mask = _row(1.0, 0.5, 0.0, 0.0)
    out = masked_prior_loss(loss, mask)
    # (1 + 1 + 2 + 2) / (1.5 * 2 channels) = 2, not 4.
    assert _scalar(out.target) == pytest.approx(2.0)


def test_video_loss_5d_with_4d_and_5d_masks():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 1, 2)  # (B, C, F=2, H, W)
    mask_4d = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 2, 1, 2)  # (B, F, H, W)
    mask_5d = mask_4d.unsqueeze(1)  # (B, 1, F, H, W)
    assert _scalar(masked_prior_loss(loss, mask_4d).total) == pytest.approx(1.5)
    assert _scalar(masked_prior_loss(loss, mask_5d).total) == pytest.approx(1.5)


def test_video_mask_with_one_channel_per_loss_channel():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 1, 1, 2)  # (B, C=2, F, H, W)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 1, 1, 2)
    assert _scalar(masked_prior_loss(loss, mask).total) == pytest.approx(2.5)


def _layered_loss(layers: int = 3, channels: int = 2, scale: float = 1.0) -> torch.Tensor:
    """(B=1, L, C, H=1, W=2) with every element of layer l equal to scale * (l + 1)."""
    values = scale * torch.arange(1, layers + 1, dtype=torch.float32)
    return values.reshape(1, layers, 1, 1, 1).expand(1, layers, channels, 1, 2).clone()


def test_layered_layout_matches_mask_layers_to_loss_dim_1():
    loss = _layered_loss()  # (1, L=3, C=2, 1, 2)
    prior_loss = _layered_loss(scale=10.0)
    mask = torch.zeros(1, 1, 3, 1, 2)  # (B, 1, L, H, W)
    mask[:, :, 1] = 1.0  # learn layer 1 only
    out = masked_prior_loss(loss, mask, prior_loss=prior_loss, prior_weight=1.0, layout="layered")
    assert _scalar(out.target) == pytest.approx(2.0)
    assert _scalar(out.prior) == pytest.approx((10.0 + 30.0) / 2)
    out_4d_mask = masked_prior_loss(
        loss, mask[:, 0], prior_loss=prior_loss, prior_weight=1.0, layout="layered"
    )
    assert _scalar(out_4d_mask.total) == pytest.approx(_scalar(out.total))


def test_layered_drop_base_frame_drops_mask_layer_0():
    loss = _layered_loss()  # (1, L=3, C=2, 1, 2)
    mask = torch.zeros(1, 1, 4, 1, 2)  # base layer + 3 layers
    mask[:, :, 0] = 1.0  # the base layer must be ignored
    mask[:, :, 2] = 1.0  # loss layer 1
    out = masked_prior_loss(loss, mask, layout="layered", drop_base_frame=True)
    assert _scalar(out.target) == pytest.approx(2.0)
    assert _scalar(out.target_weight_mean) == pytest.approx(1.0 / 3.0)
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 1, 2\).*\(1, 3, 2, 1, 2\)"):
        masked_prior_loss(loss, mask, layout="layered")


def test_video_layout_ignores_drop_base_frame():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 1, 2)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 2, 1, 2)
    out = masked_prior_loss(loss, mask, drop_base_frame=True)
    assert _scalar(out.total) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("loss_shape", "mask_shape", "layout", "drop_base_frame"),
    [
        ((2, 4, 3, 8, 8), (1, 3, 8, 8), "video", False),  # batch
        ((2, 4, 3, 8, 8), (2, 2, 8, 8), "video", False),  # frames
        ((2, 4, 3, 8, 8), (2, 3, 4, 4), "video", False),  # spatial
        ((2, 4, 3, 8, 8), (2, 3, 3, 8, 8), "video", False),  # mask channels neither 1 nor C
        ((2, 4, 8, 8), (2, 1, 4, 4), "video", False),  # image spatial
        ((2, 4, 8, 8), (2, 2, 8, 8), "video", False),  # image mask with two frames
        ((2, 3, 4, 8, 8), (2, 1, 2, 8, 8), "layered", False),  # layers
        ((2, 3, 4, 8, 8), (2, 1, 3, 8, 8), "layered", True),  # layers after the drop
        ((2, 3, 4, 8, 8), (2, 1, 3, 4, 4), "layered", False),  # spatial
        ((2, 3, 4, 8, 8), (2, 2, 3, 8, 8), "layered", False),  # mask channels neither 1 nor C
        ((2, 3, 4, 8, 8), (2, 3, 8), "video", False),  # 3-D mask
    ],
)
def test_shape_mismatch_raises_naming_both_shapes(loss_shape, mask_shape, layout, drop_base_frame):
    with pytest.raises(ValueError) as info:
        masked_prior_loss(
            torch.ones(loss_shape),
            torch.ones(mask_shape),
            layout=layout,
            drop_base_frame=drop_base_frame,
        )
    assert str(loss_shape) in str(info.value)
    assert str(mask_shape) in str(info.value)


def test_4d_loss_is_rejected_for_layered_layout():
    with pytest.raises(ValueError, match=r"4D loss.*\(2, 4, 8, 8\)"):
        masked_prior_loss(torch.ones(2, 4, 8, 8), torch.ones(2, 1, 8, 8), layout="layered")


def test_loss_with_wrong_rank_is_rejected():
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        masked_prior_loss(torch.ones(2, 8, 8), torch.ones(2, 1, 8, 8))


def test_prior_loss_shape_must_match_loss():
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 4\).*\(2, 4, 8, 8\)"):
        masked_prior_loss(
            torch.ones(2, 4, 8, 8),
            torch.ones(2, 1, 8, 8),
            prior_loss=torch.ones(2, 4, 8, 4),
            prior_weight=1.0,
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prior_weight": -1.0}, "prior_weight"),
        ({"layout": "image"}, "layout"),
        ({"gamma": 0.0}, "gamma"),
        ({"min_weight": 2.0}, "min_weight"),
    ],
)
def test_masked_prior_loss_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        masked_prior_loss(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), **kwargs)


# --------------------------------------------------------------------------- regions


def _binary_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    loss = torch.rand(2, 4, 3, 6, 6, generator=generator)
    prior_loss = torch.rand(2, 4, 3, 6, 6, generator=generator)
    mask = (torch.rand(2, 3, 6, 6, generator=generator) > 0.5).float()
    return loss, prior_loss, mask


@pytest.mark.parametrize("normalize_per_sample", [False, True])
@pytest.mark.parametrize("prior_threshold", [None, 0.1])
def test_target_loss_ignores_regions_where_mask_is_zero(normalize_per_sample, prior_threshold):
    loss, prior_loss, mask = _binary_case()
    settings = {
        "prior_loss": prior_loss,
        "prior_weight": 1.0,
        "prior_threshold": prior_threshold,
        "normalize_per_sample": normalize_per_sample,
    }
    reference = masked_prior_loss(loss, mask, **settings)
    huge_outside = torch.where(mask.unsqueeze(1).expand_as(loss) == 0, 1e6, loss)
    out = masked_prior_loss(huge_outside, mask, **settings)
    assert _scalar(out.target) == pytest.approx(_scalar(reference.target), rel=1e-6)
    assert _scalar(out.prior) == pytest.approx(_scalar(reference.prior), rel=1e-6)


@pytest.mark.parametrize("normalize_per_sample", [False, True])
@pytest.mark.parametrize("prior_threshold", [None, 0.1])
def test_prior_loss_is_zero_where_mask_is_one(normalize_per_sample, prior_threshold):
    loss, prior_loss, mask = _binary_case(seed=1)
    settings = {
        "prior_weight": 1.0,
        "prior_threshold": prior_threshold,
        "normalize_per_sample": normalize_per_sample,
    }
    reference = masked_prior_loss(loss, mask, prior_loss=prior_loss, **settings)
    huge_inside = torch.where(mask.unsqueeze(1).expand_as(prior_loss) == 1, 1e6, prior_loss)
    out = masked_prior_loss(loss, mask, prior_loss=huge_inside, **settings)
    assert _scalar(out.prior) == pytest.approx(_scalar(reference.prior), rel=1e-6)
    assert _scalar(out.prior) < 1.0  # prior_loss is in [0, 1) outside the mask


def test_all_ones_mask_gives_exactly_zero_prior_and_no_prior_gradient():
    loss = torch.rand(2, 4, 8, 8)
    prior_loss = torch.rand(2, 4, 8, 8, requires_grad=True)
    out = masked_prior_loss(loss, torch.ones(2, 1, 8, 8), prior_loss=prior_loss, prior_weight=1.0)
    assert _scalar(out.prior) == 0.0
    out.total.backward()
    assert prior_loss.grad is None or torch.all(prior_loss.grad == 0)


def test_threshold_mode_hand_computed():
    loss = _row(1.0, 2.0, 3.0, 4.0)
    mask = _row(1.0, 0.5, 0.05, 0.0)
    prior_loss = _row(10.0, 20.0, 30.0, 40.0)
    out = masked_prior_loss(
        loss, mask, prior_loss=prior_loss, prior_weight=1.0, prior_threshold=0.1
    )
    # m = [1, 0.5, 0, 0] (raw 0.05 is below the threshold: overlap removed); p = [0, 0, 1, 1].
    assert _scalar(out.target) == pytest.approx((1.0 + 1.0) / 1.5)
    assert _scalar(out.prior) == pytest.approx((30.0 + 40.0) / 2.0)
    assert _scalar(out.target_weight_mean) == pytest.approx(1.5 / 4)
    assert _scalar(out.prior_weight_mean) == pytest.approx(0.5)

    continuous = masked_prior_loss(loss, mask, prior_loss=prior_loss, prior_weight=1.0)
    # m = [1, 0.5, 0.05, 0]; p = [0, 0.5, 0.95, 1].
    assert _scalar(continuous.target) == pytest.approx((1.0 + 1.0 + 0.15) / 1.55)
    assert _scalar(continuous.prior) == pytest.approx((10.0 + 28.5 + 40.0) / 2.45)


def test_threshold_mode_decides_on_the_raw_mask():
    loss = _row(1.0, 2.0, 3.0, 4.0)
    prior_loss = _row(10.0, 20.0, 30.0, 40.0)
    mask = _row(1.0, 0.12, 0.05, 0.0)
    out = masked_prior_loss(
        loss, mask, prior_loss=prior_loss, prior_weight=1.0, gamma=3.0, prior_threshold=0.1
    )
    # Processed 0.12 ** 3 = 0.001728 is below 0.1, but raw 0.12 is not: no prior there.
    m1 = 0.12**3
    assert _scalar(out.prior) == pytest.approx(35.0)
    assert _scalar(out.target) == pytest.approx((1.0 + 2.0 * m1) / (1.0 + m1), rel=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.7])
@pytest.mark.parametrize("min_weight", [0.0, 0.1])
def test_backward_compat_without_prior_is_plain_weighted_mean(gamma, min_weight):
    generator = torch.Generator().manual_seed(3)
    loss = torch.rand(3, 4, 2, 5, 5, generator=generator)
    mask = torch.rand(3, 2, 5, 5, generator=generator)
    m = (mask**gamma * (1 - min_weight) + min_weight).unsqueeze(1).expand_as(loss)
    expected = float((loss * m).sum() / m.sum())
    for prior_loss in (None, torch.rand(3, 4, 2, 5, 5, generator=generator)):
        out = masked_prior_loss(
            loss, mask, prior_loss=prior_loss, gamma=gamma, min_weight=min_weight
        )
        assert _scalar(out.total) == pytest.approx(expected, rel=1e-6)
        assert _scalar(out.target) == pytest.approx(expected, rel=1e-6)
        assert _scalar(out.prior) == 0.0


def test_prior_loss_without_weight_or_without_teacher_is_zero():
    loss, prior_loss, mask = _binary_case()
    assert _scalar(masked_prior_loss(loss, mask, prior_loss=prior_loss).prior) == 0.0
    assert _scalar(masked_prior_loss(loss, mask, prior_weight=1.0).prior) == 0.0


def test_prior_weight_scales_only_the_prior_term():
    loss, prior_loss, mask = _binary_case()
    one = masked_prior_loss(loss, mask, prior_loss=prior_loss, prior_weight=1.0)
    half = masked_prior_loss(loss, mask, prior_loss=prior_loss, prior_weight=0.5)
    assert _scalar(half.target) == pytest.approx(_scalar(one.target))
    assert _scalar(half.prior) == pytest.approx(0.5 * _scalar(one.prior))


# --------------------------------------------------------------------------- normalisation


def _two_samples() -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.cat([_row(1.0, 1.0, 1.0, 1.0), _row(3.0, 3.0, 3.0, 3.0)])  # (2, 1, 1, 4)
    mask = torch.cat([_row(1.0, 0.0, 0.0, 0.0), _row(1.0, 1.0, 1.0, 0.0)])
    return loss, mask


def test_per_sample_and_global_normalisation_differ_with_coverage():
    loss, mask = _two_samples()
    global_ = masked_prior_loss(loss, mask)
    per_sample = masked_prior_loss(loss, mask, normalize_per_sample=True)
    assert _scalar(global_.target) == pytest.approx((1.0 + 9.0) / 4.0)  # large mask dominates
    assert _scalar(per_sample.target) == pytest.approx((1.0 + 3.0) / 2.0)  # samples count equally


def test_per_sample_zero_weight_samples_contribute_zero():
    loss = torch.cat([_row(1.0, 1.0), _row(3.0, 3.0)])  # (2, 1, 1, 2)
    prior_loss = torch.cat([_row(7.0, 7.0), _row(5.0, 5.0)])
    mask = torch.cat([_row(1.0, 1.0), _row(0.0, 0.0)])  # sample 0 all target, sample 1 all prior
    settings = {"prior_loss": prior_loss, "prior_weight": 1.0}
    per_sample = masked_prior_loss(loss, mask, normalize_per_sample=True, **settings)
    # Each term: the empty sample contributes 0 but still counts in the batch mean.
    assert _scalar(per_sample.target) == pytest.approx((1.0 + 0.0) / 2.0)
    assert _scalar(per_sample.prior) == pytest.approx((0.0 + 5.0) / 2.0)
    global_ = masked_prior_loss(loss, mask, **settings)
    assert _scalar(global_.target) == pytest.approx(1.0)
    assert _scalar(global_.prior) == pytest.approx(5.0)


_MODES = list(
    itertools.product(
        [False, True],  # normalize_per_sample
        [None, 0.1],  # prior_threshold
        [0.0, 0.2],  # min_weight
        [1.0, 0.7],  # gamma
    )
)


@pytest.mark.parametrize("fill", [0.0, 1.0])
@pytest.mark.parametrize(("per_sample", "threshold", "min_weight", "gamma"), _MODES)
def test_uniform_masks_are_finite_in_every_mode(fill, per_sample, threshold, min_weight, gamma):
    loss = torch.rand(2, 4, 3, 4, 4, requires_grad=True)
    prior_loss = torch.rand(2, 4, 3, 4, 4, requires_grad=True)
    out = masked_prior_loss(
        loss,
        torch.full((2, 3, 4, 4), fill),
        prior_loss=prior_loss,
        prior_weight=1.0,
        gamma=gamma,
        min_weight=min_weight,
        prior_threshold=threshold,
        normalize_per_sample=per_sample,
    )
    for value in _fields(out):
        assert torch.isfinite(value)
    out.total.backward()
    assert torch.all(torch.isfinite(loss.grad))
    assert prior_loss.grad is None or torch.all(torch.isfinite(prior_loss.grad))
    if fill == 1.0:
        assert _scalar(out.prior) == 0.0
        assert _scalar(out.target) == pytest.approx(float(loss.detach().mean()), rel=1e-5)
    elif min_weight == 0.0 or threshold is not None:
        assert _scalar(out.target) == 0.0
        assert _scalar(out.prior) == pytest.approx(float(prior_loss.detach().mean()), rel=1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
def test_weight_sums_below_epsilon_count_as_empty(per_sample):
    # sum(m) = 4e-12 < 1e-8: the target term is 0 (not loss.mean()), the prior term is normal.
    loss = _row(1.0, 2.0, 3.0, 4.0)
    prior_loss = _row(10.0, 20.0, 30.0, 40.0)
    out = masked_prior_loss(
        loss,
        torch.full_like(loss, 1e-12),
        prior_loss=prior_loss,
        prior_weight=1.0,
        normalize_per_sample=per_sample,
    )
    assert _scalar(out.target) == 0.0
    assert _scalar(out.prior) == pytest.approx(25.0)


# --------------------------------------------------------------------------- dtypes, purity, grads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_summed_in_float32(dtype):
    # 2*4*2*32*32 elements of 1000 sum to 1.6e7, far past float16's maximum of 65504.
    loss = torch.full((2, 4, 2, 32, 32), 1000.0, dtype=dtype)
    prior_loss = torch.full((2, 4, 2, 32, 32), 500.0, dtype=dtype)
    mask = (torch.rand(2, 2, 32, 32) > 0.5).to(dtype)
    for per_sample in (False, True):
        out = masked_prior_loss(
            loss, mask, prior_loss=prior_loss, prior_weight=1.0, normalize_per_sample=per_sample
        )
        for value in _fields(out):
            assert value.dtype == torch.float32
        assert _scalar(out.target) == pytest.approx(1000.0)
        assert _scalar(out.prior) == pytest.approx(500.0)
    plain = masked_prior_loss(loss, None)
    assert _scalar(plain.total) == pytest.approx(1000.0)


def test_half_precision_matches_float32_computation():
    generator = torch.Generator().manual_seed(5)
    loss = torch.rand(2, 4, 3, 8, 8, generator=generator).half()
    prior_loss = torch.rand(2, 4, 3, 8, 8, generator=generator).half()
    mask = torch.rand(2, 3, 8, 8, generator=generator).half()
    settings = {"prior_weight": 0.8, "gamma": 0.7, "normalize_per_sample": True}
    half = masked_prior_loss(loss, mask, prior_loss=prior_loss, **settings)
    full = masked_prior_loss(loss.float(), mask.float(), prior_loss=prior_loss.float(), **settings)
    for got, want in zip(_fields(half), _fields(full), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("per_sample", "threshold", "min_weight", "gamma"), _MODES)
def test_inputs_are_not_modified(per_sample, threshold, min_weight, gamma):
    loss = torch.rand(2, 4, 4, 4, 4)  # video (B, C, F, H, W) and layered (B, L, C, H, W)
    prior_loss = torch.rand(2, 4, 4, 4, 4)
    mask = torch.rand(2, 1, 5, 4, 4) * 1.4 - 0.2  # out of range on purpose: clamp must copy
    before = [t.clone() for t in (loss, prior_loss, mask)]
    for layout, drop in (("video", False), ("layered", True)):
        video_mask = mask[:, :, 1:]  # (2, 1, 4, 4, 4) for the video layout
        masked_prior_loss(
            loss,
            video_mask if layout == "video" else mask,
            prior_loss=prior_loss,
            prior_weight=1.0,
            gamma=gamma,
            min_weight=min_weight,
            prior_threshold=threshold,
            normalize_per_sample=per_sample,
            layout=layout,
            drop_base_frame=drop,
        )
    for tensor, original in zip((loss, prior_loss, mask), before, strict=True):
        assert torch.equal(tensor, original)


def test_gradients_flow_into_loss_and_prior_loss_global():
    loss = _row(1.0, 2.0, 3.0, 4.0).requires_grad_()
    prior_loss = _row(10.0, 20.0, 30.0, 40.0).requires_grad_()
    mask = _row(1.0, 0.5, 0.0, 0.0)
    masked_prior_loss(loss, mask, prior_loss=prior_loss, prior_weight=2.0).total.backward()
    # d total / d loss = m / sum(m); d total / d prior_loss = w_prior * p / sum(p).
    torch.testing.assert_close(loss.grad, _row(1.0, 0.5, 0.0, 0.0) / 1.5)
    torch.testing.assert_close(prior_loss.grad, 2.0 * _row(0.0, 0.5, 1.0, 1.0) / 2.5)


def test_gradients_flow_per_sample():
    loss, mask = _two_samples()
    loss.requires_grad_()
    masked_prior_loss(loss, mask, normalize_per_sample=True).total.backward()
    # Each sample: m_b / sum_b(m) / B.
    expected = torch.cat([mask[:1] / 1.0, mask[1:] / 3.0]) / 2.0
    torch.testing.assert_close(loss.grad, expected)


@pytest.mark.parametrize("per_sample", [False, True])
def test_backward_works_when_every_region_is_empty(per_sample):
    loss = torch.rand(2, 4, 8, 8, requires_grad=True)
    out = masked_prior_loss(loss, torch.zeros(2, 1, 8, 8), normalize_per_sample=per_sample)
    assert _scalar(out.total) == 0.0
    out.total.backward()
    assert torch.all(loss.grad == 0)


def test_half_precision_gradients_are_finite():
    loss = torch.rand(1, 4, 8, 8).half().requires_grad_()
    out = masked_prior_loss(loss, torch.rand(1, 1, 8, 8), gamma=0.7, normalize_per_sample=True)
    out.total.backward()
    assert loss.grad.dtype == torch.float16
    assert torch.all(torch.isfinite(loss.grad))


# --------------------------------------------------------------------------- no mask, dataclasses


def test_no_mask_is_plain_mean():
    loss = torch.rand(2, 4, 3, 8, 8, requires_grad=True)
    prior_loss = torch.rand(2, 4, 3, 8, 8)
    out = masked_prior_loss(loss, None, prior_loss=prior_loss, prior_weight=1.0)
    assert _scalar(out.total) == pytest.approx(float(loss.detach().mean()))
    assert _scalar(out.target) == pytest.approx(float(loss.detach().mean()))
    assert _scalar(out.prior) == 0.0
    assert _scalar(out.target_weight_mean) == 1.0
    assert _scalar(out.prior_weight_mean) == 0.0
    out.total.backward()
    torch.testing.assert_close(loss.grad, torch.full_like(loss, 1.0 / loss.numel()))


def test_weight_means_are_detached_float32_scalars():
    loss = torch.rand(1, 2, 1, 4)
    mask = _row(1.0, 0.5, 0.25, 0.0).requires_grad_()
    out = masked_prior_loss(loss, mask)
    assert not out.target_weight_mean.requires_grad
    assert _scalar(out.target_weight_mean) == pytest.approx(1.75 / 4)
    assert _scalar(out.prior_weight_mean) == pytest.approx(2.25 / 4)


def test_dataclasses_are_frozen_and_keep_the_fixed_three_field_constructor():
    breakdown = LossBreakdown(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0))
    assert float(breakdown.target_weight_mean) == 1.0
    assert float(breakdown.prior_weight_mean) == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        breakdown.total = torch.tensor(2.0)
    weights = MaskWeights(target=torch.ones(1), prior=torch.zeros(1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        weights.prior = torch.ones(1)


# --------------------------------------------------------------------------- the step's entry


def test_weighting_is_one_frozen_description_checked_once():
    weighting = Weighting(gamma=0.7, min_weight=0.1, prior_threshold=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        weighting.gamma = 1.0  # type: ignore[misc]
    raw = torch.tensor([0.0, 0.5, 1.0])
    maps, direct = weighting.maps(raw), process_masks(raw, gamma=0.7, min_weight=0.1)
    assert torch.equal(maps.target, direct.target) and torch.equal(maps.prior, direct.prior)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        Weighting(gamma=0.0)
    with pytest.raises(ValueError, match="min_weight must be in"):
        Weighting(min_weight=1.5)


def _predictions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prediction, target, teacher (B=2, C=1, H=1, W=2) and masks (B, 1, 1, 2):

        sample 0: prediction [1, 2], target [0, 0], teacher [1, 0], mask [1, 0]
        sample 1: prediction [0, 0], target [1, 3], teacher [0, 1], mask [1, 1]
    so (prediction - target)^2 is [1, 4] and [1, 9]; (prediction - teacher)^2 is [0, 4], [0, 1].
    """
    prediction = torch.tensor([1.0, 2.0, 0.0, 0.0]).reshape(2, 1, 1, 2)
    target = torch.tensor([0.0, 0.0, 1.0, 3.0]).reshape(2, 1, 1, 2)
    teacher = torch.tensor([1.0, 0.0, 0.0, 1.0]).reshape(2, 1, 1, 2)
    masks = torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(2, 1, 1, 2)
    return prediction, target, teacher, masks


def test_prediction_loss_concept_weight_and_noise_gate_by_hand():
    prediction, target, teacher, masks = _predictions()
    weighting = Weighting()
    out = prediction_loss(
        prediction,
        target,
        weighting.maps(masks),
        weighting,
        teacher=teacher,
        prior_weight=0.5,
        sample_weight=torch.tensor([2.0, 0.5]),
        prior_gate=torch.tensor([True, False]),
    )
    # Weighted: loss [2, 8] and [0.5, 4.5]; m = [1, 0], [1, 1]: (2 + 0.5 + 4.5) / 3.
    assert _scalar(out.target) == pytest.approx(7 / 3)
    # Prior: [0, 8] (gate 1) and [0, 0] (gate 0); p = [0, 1], [0, 0]: 8 / 1 * 0.5.
    assert _scalar(out.prior) == pytest.approx(4.0)
    assert _scalar(out.total) == pytest.approx(7 / 3 + 4.0)

    # The gate closed on sample 0 instead: its prior loss is gone, its map still counts.
    gated = prediction_loss(
        prediction,
        target,
        weighting.maps(masks),
        weighting,
        teacher=teacher,
        prior_weight=0.5,
        sample_weight=torch.tensor([2.0, 0.5]),
        prior_gate=torch.tensor([0.0, 1.0]),
    )
    assert _scalar(gated.prior) == 0.0
    assert _scalar(gated.target) == pytest.approx(7 / 3)


def test_prediction_loss_per_sample_uses_the_weighting_s_normalisation():
    prediction, target, teacher, masks = _predictions()
    weighting = Weighting(normalize_per_sample=True)
    out = prediction_loss(
        prediction,
        target,
        weighting.maps(masks),
        weighting,
        teacher=teacher,
        prior_weight=1.0,
        sample_weight=torch.tensor([2.0, 0.5]),
    )
    # Target: sample 0 (2) / 1 = 2; sample 1 (0.5 + 4.5) / 2 = 2.5; mean 2.25.
    assert _scalar(out.target) == pytest.approx(2.25)
    # Prior: sample 0 (8) / 1 = 8; sample 1 has no prior region: 0; mean 4.
    assert _scalar(out.prior) == pytest.approx(4.0)


def test_prediction_loss_without_masks_or_teacher():
    prediction, target, teacher, _ = _predictions()
    weighting = Weighting()
    plain = prediction_loss(prediction, target, None, weighting, teacher=teacher, prior_weight=1)
    assert _scalar(plain.total) == pytest.approx((1 + 4 + 1 + 9) / 4)
    assert _scalar(plain.prior) == 0.0
    weighted = prediction_loss(
        prediction, target, None, weighting, sample_weight=torch.tensor([2.0, 0.0])
    )
    assert _scalar(weighted.total) == pytest.approx((2 + 8) / 4)
    with pytest.raises(ValueError, match="teacher must have the prediction's shape"):
        prediction_loss(prediction, target, None, weighting, teacher=teacher[:1], prior_weight=1)


def test_prediction_loss_gradient_reaches_only_the_prediction():
    prediction, target, teacher, masks = _predictions()
    prediction.requires_grad_(True)
    weighting = Weighting()
    out = prediction_loss(
        prediction, target, weighting.maps(masks), weighting, teacher=teacher, prior_weight=1.0
    )
    out.total.backward()
    # d/dpred of sum(m (p - t)^2) / sum(m) + sum(q (p - s)^2) / sum(q), m sums to 3, q to 1.
    expected = torch.tensor([2 * 1 / 3, 2 * (2 - 0), 2 * -1 / 3, 2 * -3 / 3]).reshape(2, 1, 1, 2)
    torch.testing.assert_close(prediction.grad, expected)


@pytest.mark.parametrize("seed", range(12))
def test_prediction_loss_equals_masked_prior_loss_of_its_losses(seed):
    """The step's entry and the fixed interface reduce alike, for every layout and setting."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    layout = rng.choice(["video", "layered"])
    drop = layout == "layered" and rng.random() < 0.5
    shape = (3, 2, 4, 3, 5) if layout == "layered" else rng.choice([(3, 4, 5, 6), (3, 4, 2, 5, 6)])
    if layout == "layered":
        mask_shape = (3, 1, shape[1] + drop, shape[3], shape[4])
    else:
        mask_shape = (3, 1, *shape[2:])  # (B, 1, [F,] H, W)
    weighting = Weighting(
        gamma=rng.choice([1.0, 0.7]),
        min_weight=rng.choice([0.0, 0.2]),
        prior_threshold=rng.choice([None, 0.4]),
        normalize_per_sample=rng.random() < 0.5,
    )
    prediction, target, teacher = (torch.randn(shape, generator=generator) for _ in range(3))
    masks = _random_mask(mask_shape, rng)
    sample_weight = torch.tensor([1.0, 0.5, 2.0])
    gate = torch.tensor([True, False, True])
    out = prediction_loss(
        prediction,
        target,
        weighting.maps(masks),
        weighting,
        teacher=teacher,
        prior_weight=0.7,
        sample_weight=sample_weight,
        prior_gate=gate,
        layout=layout,
        drop_base_frame=drop,
    )
    view = (-1,) + (1,) * (len(shape) - 1)
    loss = (prediction - target) ** 2 * sample_weight.view(view)
    prior_loss = (prediction - teacher) ** 2 * sample_weight.view(view) * gate.view(view)
    expected = masked_prior_loss(
        loss,
        masks,
        prior_loss=prior_loss,
        prior_weight=0.7,
        gamma=weighting.gamma,
        min_weight=weighting.min_weight,
        prior_threshold=weighting.prior_threshold,
        normalize_per_sample=weighting.normalize_per_sample,
        layout=layout,
        drop_base_frame=drop,
    )
    for name in ("total", "target", "prior", "target_weight_mean", "prior_weight_mean"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name))


# --------------------------------------------------------------------------- randomized reference


def _reference(
    loss, mask, prior_loss, *, prior_weight, gamma, min_weight, threshold, per_sample, layout, drop
):
    """Design section 2 written out element by element in float64, independent of the module."""
    loss = loss.double()
    prior_loss = prior_loss.double() if prior_loss is not None else None
    mask = mask.double()
    if loss.ndim == 4:
        loss = loss[:, :, None]
        prior_loss = prior_loss[:, :, None] if prior_loss is not None else None
    if mask.ndim == 4:
        mask = mask[:, None]
    raw = torch.empty_like(loss)  # the raw mask value of every loss element
    if layout == "video":
        for c in range(loss.shape[1]):
            raw[:, c] = mask[:, 0 if mask.shape[1] == 1 else c]
    else:
        layers = mask[:, 0, 1:] if drop else mask[:, 0]  # (B, L, H, W)
        for layer in range(loss.shape[1]):
            for c in range(loss.shape[2]):
                raw[:, layer, c] = layers[:, layer]
    raw = raw.clamp(0, 1)
    m = raw**gamma
    if min_weight > 0:
        m = m * (1 - min_weight) + min_weight
    p = 1 - m
    if threshold is not None:
        p = (raw < threshold).double()
        m = m * (1 - p)

    def weighted_mean(values, weights):
        if per_sample:
            means = []
            for b in range(values.shape[0]):
                weight = weights[b].sum()
                means.append(float((values[b] * weights[b]).sum() / weight) if weight > 1e-8 else 0)
            return sum(means) / len(means)
        weight = weights.sum()
        return float((values * weights).sum() / weight) if weight >= 1e-8 else 0.0

    target = weighted_mean(loss, m)
    prior = 0.0
    if prior_weight > 0 and prior_loss is not None and p.sum() >= 1e-8:
        prior = weighted_mean(prior_loss, p) * prior_weight
    return target, prior, float(m.mean()), float(p.mean())


def _random_mask(shape: tuple[int, ...], rng: random.Random) -> torch.Tensor:
    kind = rng.choice(["continuous", "tiers", "binary"])
    if kind == "continuous":
        mask = torch.rand(shape) * 1.4 - 0.2  # includes values outside [0, 1]
    elif kind == "tiers":
        tiers = torch.tensor([0.0, 80 / 255, 128 / 255, 1.0])
        mask = tiers[torch.randint(0, 4, shape)]
    else:
        mask = (torch.rand(shape) > 0.5).float()
    if rng.random() < 0.3:
        mask[0] = rng.choice([0.0, 1.0])  # an empty or a full sample
    return mask


@pytest.mark.parametrize("seed", range(60))
def test_matches_reference_on_random_shapes_and_settings(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    batch, channels = rng.randint(1, 3), rng.randint(1, 4)
    height, width = rng.randint(1, 5), rng.randint(1, 5)
    layout = rng.choice(["video", "layered"])
    drop = layout == "layered" and rng.random() < 0.5
    frames = rng.randint(1, 4)
    if layout == "video":
        loss_shape = rng.choice(
            [(batch, channels, height, width), (batch, channels, frames, height, width)]
        )
        mask_frames = loss_shape[2] if len(loss_shape) == 5 else 1
        mask_shape = rng.choice(
            [
                (batch, mask_frames, height, width),
                (batch, 1, mask_frames, height, width),
            ]
        )
        if len(loss_shape) == 5 and rng.random() < 0.2:
            mask_shape = loss_shape  # one mask per channel
    else:
        loss_shape = (batch, frames, channels, height, width)  # (B, L, C, H, W)
        mask_layers = frames + 1 if drop else frames
        mask_shape = rng.choice(
            [(batch, 1, mask_layers, height, width), (batch, mask_layers, height, width)]
        )
    settings = {
        "prior_weight": rng.choice([0.0, 0.5, 1.0, 2.0]),
        "gamma": rng.choice([1.0, 0.7, 2.0]),
        "min_weight": rng.choice([0.0, 0.0, 0.1, 0.5]),
        "threshold": rng.choice([None, None, 0.05, 0.1, 0.5]),
        "per_sample": rng.random() < 0.5,
    }
    loss = torch.rand(loss_shape) * rng.choice([1.0, 100.0])
    prior_loss = torch.rand(loss_shape) if rng.random() < 0.8 else None
    mask = _random_mask(mask_shape, rng)

    out = masked_prior_loss(
        loss,
        mask,
        prior_loss=prior_loss,
        prior_weight=settings["prior_weight"],
        gamma=settings["gamma"],
        min_weight=settings["min_weight"],
        prior_threshold=settings["threshold"],
        normalize_per_sample=settings["per_sample"],
        layout=layout,
        drop_base_frame=drop,
    )
    target, prior, target_mean, prior_mean = _reference(
        loss, mask, prior_loss, layout=layout, drop=drop, **settings
    )
    assert _scalar(out.target) == pytest.approx(target, rel=1e-5, abs=1e-6)
    assert _scalar(out.prior) == pytest.approx(prior, rel=1e-5, abs=1e-6)
    assert _scalar(out.total) == pytest.approx(target + prior, rel=1e-5, abs=1e-6)
    assert _scalar(out.target_weight_mean) == pytest.approx(target_mean, rel=1e-5, abs=1e-6)
    assert _scalar(out.prior_weight_mean) == pytest.approx(prior_mean, rel=1e-5, abs=1e-6)
