"""The opt-in dense mask loss (``LossConfig.mask_loss="dense"``, ``m2f-jax train --mask-loss dense``).

Oracle: the uniform point loss (transformers' point-sampled loss with importance_sample_ratio 0,
i.e. ``mask_loss="points"``), averaged over enough draws that its standard error resolves the
gaps measured here. Each pair is one call with one query and one target, so the matching is held
fixed. The logits are the model's own, at 256x256 input (a 64x64 logit grid): random init and the
embedded default model (trained on the synthetic shapes); the targets are the synthetic scene's
shapes, three masks under 1% of the crop and a stuff region.

What it is (measured by :func:`test_dense_terms_and_gradients_vs_the_uniform_point_loss`):
dense dice is within 2% of the point dice on random-init logits; dense BCE is higher than the
point BCE, because the points read the logits bilinearly interpolated inside a cell and the BCE is
convex in the logit (random init: 2-6% higher). On the trained model's sharp logits the gap
grows where the loss is small and sits at mask edges: the measured bounds are asserted below.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2f_jax.modeling.criterion import LossConfig, mask2former_loss, mask2former_loss_sums
from m2f_jax.modeling.matcher import dense_mask_costs, dense_targets, point_mask_costs

NUM_LABELS = 5
NUM_POINTS = 4096
DRAWS = 96


def test_dense_targets_are_area_averages_of_the_zero_padded_4x4_blocks():
    """Oracle: a NumPy loop over the blocks of the zero-padded masks (10x7 -> 3x2 grid)."""
    masks = np.random.default_rng(0).uniform(size=(2, 3, 10, 7)).astype(np.float32)
    padded = np.zeros((2, 3, 12, 8), np.float32)
    padded[:, :, :10, :7] = masks
    expected = np.zeros((2, 3, 3, 2), np.float32)
    for i in range(3):
        for j in range(2):
            expected[:, :, i, j] = padded[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean(axis=(2, 3))
    np.testing.assert_allclose(dense_targets(jnp.asarray(masks), (3, 2)), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="do not tile the 16x20 mask-logit grid"):
        dense_targets(jnp.zeros((1, 1, 64, 64)), (16, 20))


def test_dense_loss_is_hand_computable_and_returns_its_sums_and_denominators():
    """Oracle: the formulas by hand in NumPy on a 2x2 grid (one query, one target), dice's sums
    scaled by P / N; the loss's sums over its denominators are its terms."""
    logits = np.array([[[[2.0, -1.0], [0.5, -3.0]]]], np.float32)  # (1, 1, 2, 2)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[0, 0, :4, :4] = 1.0
    mask[0, 0, 4:, :2] = 1.0  # cell (1, 0) half covered
    t = np.array([1.0, 0.0, 0.5, 0.0])
    x = logits.reshape(-1)
    bce = np.mean(np.logaddexp(0, x) - x * t)
    p, scale = 1 / (1 + np.exp(-x)), 100 / 4
    dice = 1 - (2 * scale * np.sum(p * t) + 1) / (scale * (p.sum() + t.sum()) + 1)
    class_logits = np.zeros((1, 1, NUM_LABELS + 1), np.float32)
    cfg = LossConfig(num_labels=NUM_LABELS, train_num_points=100, mask_loss="dense", mask_weight=5.0, dice_weight=5.0)
    out = mask2former_loss(class_logits, logits, mask, np.array([[2]]), config=cfg)
    np.testing.assert_allclose([out["loss_mask"], out["loss_dice"]], [5 * bce, 5 * dice], rtol=1e-5)
    sums = mask2former_loss_sums(class_logits, logits, mask, np.array([[2]]), config=cfg)
    for name in ("loss_mask", "loss_dice", "loss_cross_entropy"):
        np.testing.assert_allclose(sums.sums[name] / sums.denominators[name], out[name], rtol=1e-6)
    assert float(sums.num_targets) == 1.0
    with pytest.raises(ValueError, match="mask_loss='dense' draws no points"):
        mask2former_loss(class_logits, logits, mask, np.array([[2]]), config=cfg, given_points=[{}])
    with pytest.raises(ValueError, match="mask_loss must be one of"):
        LossConfig(num_labels=NUM_LABELS, mask_loss="grid")


def _targets():
    """(M, 256, 256) float32: the synthetic scene's shapes, three masks under 1% of the crop, and
    the stuff region."""
    from m2f_jax.data.synthetic import render_scene

    scene = render_scene(0, "val", 0, (256, 256))
    yy, xx = np.mgrid[:256, :256]
    small = [(xx - 60) ** 2 + (yy - 190) ** 2 < 9 ** 2, (xx - 200) ** 2 + (yy - 40) ** 2 < 12 ** 2,
             (np.abs(xx - 128) < 5) & (np.abs(yy - 128) < 7)]
    masks = np.stack([s.visible_mask for s in scene.shapes] + small + [scene.label_map >= 4]).astype(np.float32)
    assert sum(m.mean() < 0.01 for m in masks) == 3
    return masks, scene.image


@pytest.fixture(scope="module")
def model_logits():
    """{"random init", "trained"}: (Q, 64, 64) mask logits of the scene image, and the targets."""
    import m2f_jax
    from m2f_jax.cli import DEFAULT_MODEL
    from m2f_jax.hub import Mask2Former
    from m2f_jax.processing.image_processor import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize

    if not os.path.isdir(DEFAULT_MODEL):
        pytest.skip("no embedded default model in this checkout")
    trained = m2f_jax.load(DEFAULT_MODEL)
    masks, image = _targets()
    pixels = jnp.asarray(normalize(image.astype(np.float32) / 255, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[None])
    forward = jax.jit(lambda params: trained.module.apply({"params": params}, pixels).masks_queries_logits[0])
    random_params = Mask2Former(trained.config, seed=1).params
    return {"random init": forward(random_params), "trained": forward(trained.params)}, jnp.asarray(masks)


def _pair_terms(mask_loss):
    """(Q=1 logits (h, w), target (H, W), key) -> ((mask, dice), their gradients (2, h, w)): one
    pair per call, so the matching is fixed."""
    cfg = LossConfig(num_labels=NUM_LABELS, mask_weight=1.0, dice_weight=1.0, train_num_points=NUM_POINTS,
                     importance_sample_ratio=0.0, oversample_ratio=0.0, mask_loss=mask_loss)

    def terms(logits, target, key):
        out = mask2former_loss(jnp.zeros((1, 1, NUM_LABELS + 1)), logits[None, None], target[None, None],
                               jnp.zeros((1, 1), jnp.int32), config=cfg, key=key)
        return jnp.stack([out["loss_mask"], out["loss_dice"]])

    return lambda logits, target, key: (terms(logits, target, key), jax.jacrev(terms)(logits, target, key))


def _cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_dense_terms_and_gradients_vs_the_uniform_point_loss(model_logits):
    """Each pair's dense mask and dice terms, and their gradients w.r.t. the logits, against the
    mean over DRAWS draws of the uniform point loss. Pairs: each target with the query the dense
    matcher picks and (random init only) with a second query."""
    logits_of, masks = model_logits
    targets = dense_targets(masks[None], (64, 64))[0]
    points = jax.jit(jax.vmap(jax.vmap(_pair_terms("points"), (None, None, 0)), (0, 0, None)))
    dense = jax.jit(jax.vmap(_pair_terms("dense"), (0, 0, None)))
    keys = jax.random.split(jax.random.key(0), DRAWS)
    measured = {}
    for name, logits in logits_of.items():
        cost_mask, cost_dice = dense_mask_costs(logits[None], targets[None], NUM_POINTS)
        queries = np.argmin(np.asarray(cost_mask + cost_dice)[0], axis=0)  # (M,) the dense matcher's pick
        slots = np.arange(len(masks))
        if name == "random init":
            queries, slots = np.concatenate([queries, (queries + 5) % logits.shape[0]]), np.concatenate([slots] * 2)
        values, grads = (np.asarray(a) for a in dense(logits[queries], masks[slots], keys[0]))  # (R, 2), (R, 2, h, w)
        draws, draw_grads = points(logits[queries], masks[slots], keys)  # (R, D, 2), (R, D, 2, h, w)
        mean, se = np.asarray(draws.mean(1)), np.asarray(draws.std(1)) / np.sqrt(DRAWS)
        gap = (values - mean) / mean  # (R, 2) relative
        cos = np.array([[_cosine(grads[r, k], draw_grads[r, :, k].mean(0)) for k in range(2)]
                        for r in range(len(queries))])
        measured[name] = mean, se, values, gap, cos
        for r in range(len(queries)):
            print(f"{name:11s} q{queries[r]:2d} target {slots[r]} ({float(masks[slots[r]].mean()):6.2%}) "
                  f"mask {values[r, 0]:.4f} {gap[r, 0]:+.3f} (se {se[r, 0] / mean[r, 0]:.4f}) "
                  f"dice {values[r, 1]:.4f} {gap[r, 1]:+.3f} (se {se[r, 1] / mean[r, 1]:.4f}) "
                  f"grad cos {cos[r, 0]:.4f} {cos[r, 1]:.4f}")

    mean, se, values, gap, cos = measured["random init"]
    assert np.all(se < 0.25 * 0.02 * mean)  # resolved: the standard error is under a quarter of 2%
    assert np.all(np.abs(gap[:, 1]) < 0.02)  # dice within 2%
    assert np.all(gap[:, 0] > 0.01) and np.all(gap[:, 0] < 0.07)  # BCE 1-7% higher (interpolation)
    assert np.all(cos[:, 0] >= 0.98) and np.all(cos[:, 1] >= 0.92)
    # trained: dense BCE is never below the point BCE (beyond 3 standard errors) and exceeds it
    # most where the loss is small (sharp, matching logits: the loss sits at the mask edges)
    mean, se, values, gap, cos = measured["trained"]
    assert np.all(values[:, 0] > mean[:, 0] - 3 * se[:, 0])
    assert np.all(gap[:, 0] < 0.6) and np.all(np.abs(gap[:, 1]) < 0.3)


def test_dense_matcher_costs_vs_the_uniform_point_costs(model_logits):
    """The matcher's dense costs of every (query, target) pair against its point costs (the
    points shared by all pairs, as transformers' matcher) averaged over DRAWS draws, random init."""
    logits_of, masks = model_logits
    logits = logits_of["random init"][None]  # (1, Q, 64, 64)
    dense_mask, dense_dice = (np.asarray(a[0]) for a in dense_mask_costs(logits, dense_targets(masks[None], (64, 64)), NUM_POINTS))
    draw = jax.jit(jax.vmap(lambda key: point_mask_costs(logits, masks[None], jax.random.uniform(key, (1, NUM_POINTS, 2)))))
    point_mask, point_dice = (np.asarray(a[:, 0]) for a in draw(jax.random.split(jax.random.key(1), DRAWS)))
    for dense_cost, point_cost in ((dense_mask, point_mask), (dense_dice, point_dice)):
        assert np.all(point_cost.std(0) / np.sqrt(DRAWS) < 0.25 * 0.02 * point_cost.mean(0))
    np.testing.assert_array_less(np.abs(dense_dice / point_dice.mean(0) - 1), 0.02)
    bce_gap = dense_mask / point_mask.mean(0) - 1
    assert np.all(bce_gap > 0.01) and np.all(bce_gap < 0.07), (bce_gap.min(), bce_gap.max())


def test_train_mask_loss_flag_reaches_the_loss_config_and_not_config_json():
    """``m2f-jax train --mask-loss dense`` -> ``TrainArgs.mask_loss`` -> the run's ``LossConfig``;
    the default is transformers' "points"; the model config (config.json) has no such key.
    Oracle: the flag's value."""
    from m2f_jax.cli import build_parser, train_args
    from m2f_jax.config import Mask2FormerConfig
    from m2f_jax.training.run import loss_config

    parser = build_parser()
    config = Mask2FormerConfig(id2label={i: str(i) for i in range(NUM_LABELS)}, train_num_points=64)
    for extra, expected in (([], "points"), (["--mask-loss", "dense"], "dense")):
        targs = train_args(parser.parse_args(["train", "--data", "d", *extra]))
        assert targs.mask_loss == expected
        cfg = loss_config(config, targs)
        assert (cfg.mask_loss, cfg.train_num_points, cfg.num_labels) == (expected, 64, NUM_LABELS)
    assert "mask_loss" not in config.to_dict()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--mask-loss", "grid"])
