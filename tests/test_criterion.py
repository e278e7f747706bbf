"""Mask2Former loss. Oracle: transformers' Mask2FormerLoss (+ get_loss_dict weighting) with its
torch.rand draws recorded and replayed; tolerance rtol 1e-4 on every loss term."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

import torch
from transformers import Mask2FormerConfig as HFConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

from m2f_jax.config import Mask2FormerConfig
from m2f_jax.modeling import variants
from m2f_jax.modeling.criterion import (
    LossConfig,
    _stack_levels,
    mask2former_loss,
    num_masks_for_normalisation,
)
from m2f_jax.modeling.matcher import matching_to_indices
from tests.hf_models import points_from_torch_draws

B, Q, NUM_LABELS, MAX_TARGETS, NUM_AUX = 2, 8, 4, 4, 2
MASK_SIZE, TARGET_SIZE, NUM_POINTS = 16, 64, 64

CONFIG = LossConfig.from_config(
    Mask2FormerConfig(id2label={i: str(i) for i in range(NUM_LABELS)}, train_num_points=NUM_POINTS)
)


def _random_case(seed, counts):
    rng = np.random.default_rng(seed)

    def prediction():
        return {
            "class_queries_logits": rng.normal(size=(B, Q, NUM_LABELS + 1)).astype(np.float32),
            "masks_queries_logits": 3
            * rng.normal(size=(B, Q, MASK_SIZE, MASK_SIZE)).astype(np.float32),
        }

    final, aux = prediction(), [prediction() for _ in range(NUM_AUX)]
    # Padded slots hold junk (full masks, class 0) that must be ignored.
    mask_labels = np.ones((B, MAX_TARGETS, TARGET_SIZE, TARGET_SIZE), np.float32)
    class_labels = np.zeros((B, MAX_TARGETS), np.int32)
    valid = np.zeros((B, MAX_TARGETS), bool)
    for b, n in enumerate(counts):
        for t in range(n):
            y0, x0 = rng.integers(0, TARGET_SIZE - 8, 2)
            y1 = y0 + rng.integers(8, TARGET_SIZE - y0 + 1)
            x1 = x0 + rng.integers(8, TARGET_SIZE - x0 + 1)
            mask_labels[b, t] = 0
            mask_labels[b, t, y0:y1, x0:x1] = 1
        class_labels[b, :n] = rng.integers(0, NUM_LABELS, n)
        valid[b, :n] = True
    return final, aux, mask_labels, class_labels, valid


def _run_transformers(final, aux, mask_labels, class_labels, counts):
    """Weighted loss dict, matched indices per level and the torch.rand draws, in call order."""
    hf_config = HFConfig(num_labels=NUM_LABELS, train_num_points=NUM_POINTS)
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    criterion = Mask2FormerLoss(hf_config, weights)
    draws, indices = [], []
    real_rand, real_match = torch.rand, criterion.matcher.forward

    def recording_rand(*args, **kwargs):
        out = real_rand(*args, **kwargs)
        draws.append(out.numpy().copy())
        return out

    def recording_match(*args, **kwargs):
        out = real_match(*args, **kwargs)
        indices.append([(i.numpy(), j.numpy()) for i, j in out])
        return out

    criterion.matcher.forward = recording_match
    torch.manual_seed(0)
    torch.rand = recording_rand
    try:
        t = torch.from_numpy
        losses = criterion(
            t(final["masks_queries_logits"]),
            t(final["class_queries_logits"]),
            mask_labels=[t(mask_labels[b, :n]) for b, n in enumerate(counts)],
            class_labels=[t(class_labels[b, :n]).long() for b, n in enumerate(counts)],
            auxiliary_predictions=[
                {k: t(v) for k, v in level.items()} for level in aux
            ],
        )
    finally:
        torch.rand = real_rand
    for key, w in weights.items():
        for name in losses:
            if key in name:
                losses[name] = losses[name] * w
    return {k: float(v) for k, v in losses.items()}, indices, draws


@functools.partial(jax.jit, static_argnames="variant")
def _loss_given_points(final, aux, mask_labels, class_labels, valid, given_points, variant="cpu"):
    with variants.use(variant):
        return mask2former_loss(
            final["class_queries_logits"], final["masks_queries_logits"], mask_labels, class_labels,
            valid, config=CONFIG, auxiliary_logits=aux, given_points=given_points, with_matchings=True,
        )


@jax.jit
@functools.partial(jax.vmap, axis_name="data")
def _synced_loss_and_grads(predictions, mask_labels, class_labels, valid, key):
    """Key path, value and gradient, per 'device' of a vmapped axis that num_masks averages over."""

    def total(predictions):
        final, aux = predictions
        losses = mask2former_loss(
            final["class_queries_logits"], final["masks_queries_logits"], mask_labels,
            class_labels, valid, config=CONFIG, auxiliary_logits=aux, key=key, axis_name="data",
        )
        return losses["loss"], losses

    (_, losses), grads = jax.value_and_grad(total, has_aux=True)(predictions)
    return losses, grads


def _two_devices(seeds_and_counts, keys):
    """Runs _synced_loss_and_grads on two 'devices', one random case each."""
    cases = [_random_case(seed, counts) for seed, counts in seeds_and_counts]
    final, aux, mask_labels, class_labels, valid = jax.tree.map(lambda *xs: np.stack(xs), *cases)
    return _synced_loss_and_grads((final, aux), mask_labels, class_labels, valid, jnp.stack(keys))


@pytest.mark.parametrize("counts,variant", [((3, 1), "cpu"), ((2, 0), "cpu"), ((0, 0), "cpu"),
                                            ((3, 1), "xla"), ((0, 0), "xla")])
def test_loss_matches_transformers_replayed_draws_rtol_1e4(counts, variant):
    """Both variants (m2f_jax.modeling.variants): the "xla" one samples channel-first maps by
    element gathers, takes lax.top_k and maps the levels with vmap."""
    final, aux, mask_labels, class_labels, valid = _random_case(sum(counts), counts)
    hf_losses, hf_indices, draws = _run_transformers(final, aux, mask_labels, class_labels, counts)
    given = points_from_torch_draws(draws, B, 1 + NUM_AUX, CONFIG)
    num_pairs = sum(min(Q, n) for n in counts)
    # Static shapes: pad the per-pair draws to B*M rows with junk; only the first R are used.
    rng = np.random.default_rng(1)
    for level in given:
        for name in ("oversampled", "random"):
            assert level[name].shape[0] == num_pairs
            junk = rng.random((B * MAX_TARGETS - num_pairs, *level[name].shape[1:]), np.float32)
            level[name] = np.concatenate([level[name], junk])

    ours, matchings = _loss_given_points(final, aux, mask_labels, class_labels, valid, given, variant=variant)

    # Matched indices of every level (final, aux 0, aux 1) are identical.
    for level in range(1 + NUM_AUX):
        matching = jax.tree.map(lambda x: x[level], matchings)
        pairs = zip(matching_to_indices(matching), hf_indices[level])
        for (rows, cols), (hf_rows, hf_cols) in pairs:
            np.testing.assert_array_equal(rows, hf_rows)
            np.testing.assert_array_equal(cols, hf_cols)
    assert set(ours) == set(hf_losses) | {"loss", "invalid_labels"} and int(ours["invalid_labels"]) == 0
    assert len(hf_losses) == 3 * (1 + NUM_AUX)
    for name, value in hf_losses.items():
        np.testing.assert_allclose(float(ours[name]), value, rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(float(ours["loss"]), sum(hf_losses.values()), rtol=1e-4)


def test_loss_jits_and_has_finite_gradients_only_for_matched_masks():
    _, grads = _two_devices([(0, (3, 1)), (1, (2, 0))], [jax.random.key(0), jax.random.key(1)])
    final_grads, aux_grads = grads
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 2 * (1 + NUM_AUX)
    for g in leaves:
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
    # Padded slots carry no loss: only the matched queries' masks get a gradient.
    for level_grads in [final_grads] + aux_grads:
        mask_grad = np.abs(np.asarray(level_grads["masks_queries_logits"])).sum(axis=(3, 4))
        assert (mask_grad > 0).sum(axis=2).tolist() == [[3, 1], [2, 0]]  # (device, image)


def test_key_path_same_key_identical_different_keys_differ():
    cases = [(5, (3, 1)), (6, (1, 2))]
    k1, k2, k3 = jax.random.key(1), jax.random.key(2), jax.random.key(3)
    a = _two_devices(cases, [k1, k3])[0]
    b = _two_devices(cases, [k1, k3])[0]
    c = _two_devices(cases, [k2, k3])[0]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_1", "loss"):
        assert float(a[name][0]) != float(c[name][0]), name
        assert float(a[name][1]) == float(c[name][1]), name  # the other device's key is unchanged


def test_num_masks_hand_computed():
    valid = jnp.array(
        [[[1, 1, 1], [1, 0, 0]], [[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]], bool
    )
    mean = jax.vmap(lambda v: num_masks_for_normalisation(v, "data"), axis_name="data")(valid)
    np.testing.assert_array_equal(mean, [2.0, 2.0, 2.0])  # (4 + 2 + 0) / 3
    np.testing.assert_array_equal(jax.vmap(num_masks_for_normalisation)(valid), [4.0, 2.0, 1.0])


def test_num_masks_averaged_over_axis_name():
    """Device 0 holds 4 targets. Beside a device with 2 targets both normalise by 3; beside one
    with 4, by 4 (its own count). Same key and data on device 0: mask terms scale by 4/3."""
    keys = [jax.random.key(7), jax.random.key(8)]
    mixed = _two_devices([(0, (3, 1)), (1, (2, 0))], keys)[0]
    own = _two_devices([(0, (3, 1)), (2, (2, 2))], keys)[0]
    for name in mixed:
        if name.startswith(("loss_mask", "loss_dice")):
            np.testing.assert_allclose(
                float(mixed[name][0]) * 3.0, float(own[name][0]) * 4.0, rtol=1e-6, err_msg=name
            )
        elif name.startswith("loss_cross_entropy"):
            assert float(mixed[name][0]) == float(own[name][0]), name


def test_stacked_auxiliary_format_equals_list_format():
    final, aux, *_ = _random_case(0, (3, 1))
    stacked = {k: np.stack([level[k] for level in aux]) for k in aux[0]}
    heads = (final["class_queries_logits"], final["masks_queries_logits"])
    from_list = _stack_levels(*heads, aux)
    from_stacked = _stack_levels(*heads, stacked)
    for k in from_list:
        assert from_list[k].shape[0] == 1 + NUM_AUX
        np.testing.assert_array_equal(from_list[k], from_stacked[k])
        np.testing.assert_array_equal(from_list[k][2], aux[1][k])


def test_bad_inputs_raise_value_error():
    final, aux, mask_labels, class_labels, valid = _random_case(0, (3, 1))
    heads = (final["class_queries_logits"], final["masks_queries_logits"])
    args = (*heads, mask_labels, class_labels, valid)
    with pytest.raises(ValueError, match="num_labels \\+ 1 = 6"):
        mask2former_loss(*args, num_labels=5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="exactly one of"):
        mask2former_loss(*args, config=CONFIG)
    with pytest.raises(ValueError, match="label_valid must have shape"):
        mask2former_loss(*args[:4], valid[:, :2], config=CONFIG, key=jax.random.key(0))
    with pytest.raises(ValueError, match="class_labels"):
        mask2former_loss(
            *args[:3], class_labels[:, :2], valid, config=CONFIG, key=jax.random.key(0)
        )
    bad_aux = [{"class_queries_logits": a["class_queries_logits"],
                "masks_queries_logits": a["masks_queries_logits"][:, :, :8]} for a in aux]
    with pytest.raises(ValueError, match="auxiliary masks_queries_logits must have shape"):
        mask2former_loss(*args, config=CONFIG, auxiliary_logits=bad_aux, key=jax.random.key(0))
    given = [{"matcher": np.zeros((B, NUM_POINTS + 1, 2)), "oversampled": np.zeros((4, 192, 2)),
              "random": np.zeros((4, 16, 2))}]
    expected = r"given_points\[0\]\['matcher'\] must have shape \(2, 64, 2\)"
    with pytest.raises(ValueError, match=expected):
        mask2former_loss(*args, config=CONFIG, given_points=given)


def test_top_k_indices_selects_what_lax_top_k_selects_ties_included():
    """The loss's top-k (bisection + compaction) against jax.lax.top_k (sorted), on values with
    many ties, signed zeros and infinities."""
    from m2f_jax.modeling.criterion import top_k_indices

    rng = np.random.default_rng(0)
    cases = [
        rng.normal(size=(4, 3000)),
        np.round(rng.normal(size=(5, 400)), 1),  # heavy ties
        -np.abs(rng.normal(size=(3, 50))),
        np.array([[0.0, -0.0, 1, -1, np.inf, -np.inf, 0, 0, -0.0, 1]]),
    ]
    for values in cases:
        values = jnp.asarray(values, jnp.float32)
        for k in sorted({1, 3, values.shape[1] // 4, values.shape[1] - 1, values.shape[1]}):
            expected = np.sort(np.asarray(jax.lax.top_k(values, k)[1]), axis=-1)
            np.testing.assert_array_equal(np.asarray(top_k_indices(values, k)), expected)


# --- class labels outside [0, num_labels) ---------------------------------------------------------


def _with_label(class_labels, image, slot, label):
    labels = np.array(class_labels)
    labels[image, slot] = label
    return labels


@pytest.mark.parametrize("bad", [-1, NUM_LABELS, 7])
def test_out_of_range_class_label_is_a_value_error_naming_it_and_the_range(bad):
    """Concrete labels (numpy or jax arrays): -1, num_labels ("no object") and 7 in a valid slot
    are errors (transformers: -1 and num_labels give a finite loss, 7 NaN)."""
    final, aux, mask_labels, class_labels, valid = _random_case(0, (3, 1))
    labels = _with_label(class_labels, 1, 0, bad)
    expected = rf"class label {bad} outside \[0, num_labels={NUM_LABELS}\) \(image 1, target slot 0"
    for given in (labels, jnp.asarray(labels)):
        with pytest.raises(ValueError, match=expected):
            mask2former_loss(final["class_queries_logits"], final["masks_queries_logits"], mask_labels, given,
                             valid, config=CONFIG, auxiliary_logits=aux, key=jax.random.key(0))


@jax.jit
def _keyed_loss_and_grads(final, mask_labels, class_labels, valid):
    def total(final):
        losses = mask2former_loss(final["class_queries_logits"], final["masks_queries_logits"], mask_labels,
                                  class_labels, valid, config=CONFIG, key=jax.random.key(0))
        return losses["loss"], losses

    (_, losses), grads = jax.value_and_grad(total, has_aux=True)(final)
    return losses, grads


def test_traced_out_of_range_class_labels_give_nan_terms_a_count_and_no_gradient():
    """Under jit the labels cannot be checked: every term is NaN, "invalid_labels" counts the
    offending valid slots (hand-counted), the gradient is zero. A padded slot's label is ignored:
    7 there gives bit for bit the loss of 0 there, with a count of 0."""
    final, _, mask_labels, class_labels, valid = _random_case(0, (3, 1))
    reference, reference_grads = _keyed_loss_and_grads(final, mask_labels, class_labels, valid)
    assert int(reference["invalid_labels"]) == 0
    assert all(np.isfinite(float(v)) for v in reference.values())
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(reference_grads))

    padded_junk, _ = _keyed_loss_and_grads(final, mask_labels, _with_label(class_labels, 1, 3, 7), valid)
    for name, value in reference.items():
        assert float(padded_junk[name]) == float(value), name

    cases = [(_with_label(class_labels, 1, 0, -1), 1), (_with_label(class_labels, 0, 2, NUM_LABELS), 1),
             (_with_label(_with_label(class_labels, 0, 0, 7), 1, 0, 7), 2)]
    for labels, count in cases:
        losses, grads = _keyed_loss_and_grads(final, mask_labels, labels, valid)
        assert int(losses["invalid_labels"]) == count
        assert set(losses) == set(reference)
        for name, value in losses.items():
            if name != "invalid_labels":
                assert np.isnan(float(value)), (name, labels.tolist())
        for g in jax.tree.leaves(grads):
            np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_model_call_with_out_of_range_class_labels_is_a_value_error(tiny_checkpoint):
    """The model object's ``model(..., class_labels=)`` (transformers' per-image lists)."""
    import m2f_jax

    model = m2f_jax.load(tiny_checkpoint[0])
    pixels = np.zeros((1, 64, 96, 3), np.float32)
    masks = [np.ones((1, 64, 96), np.float32)]
    num_labels = model.config.num_labels
    for bad in (7, -1, num_labels):
        with pytest.raises(ValueError, match=rf"class_labels must be in \[0, {num_labels}\); got \[{bad}\]"):
            model(pixels, mask_labels=masks, class_labels=[[bad]])


def test_train_step_reports_invalid_labels_as_a_metric_and_keeps_params_finite():
    """make_train_step on a stand-in module whose outputs are its parameters (the real step and
    criterion, no Mask2Former compile): a batch with one out-of-range label gives a NaN loss,
    invalid_labels == 1 (hand-counted) and finite parameters; in range, a finite loss and 0."""
    import flax.linen as nn
    import optax
    from types import SimpleNamespace

    from m2f_jax.training.train_step import TrainState, make_train_step

    class LogitsAsParams(nn.Module):
        variant: str = None

        @nn.compact
        def __call__(self, pixel_values, deterministic=True, output_auxiliary_logits=False):
            init = nn.initializers.normal(1.0)
            class_logits = self.param("class_logits", init, (Q, NUM_LABELS + 1))
            mask_logits = self.param("mask_logits", init, (Q, MASK_SIZE, MASK_SIZE))
            batch = pixel_values.shape[0]
            return SimpleNamespace(
                class_queries_logits=jnp.broadcast_to(class_logits, (batch, *class_logits.shape)),
                masks_queries_logits=jnp.broadcast_to(mask_logits, (batch, *mask_logits.shape)),
                auxiliary_logits=None,
            )

    module = LogitsAsParams()
    params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    tx = optax.sgd(0.1)
    step = jax.jit(make_train_step(module, CONFIG, tx))
    _, _, mask_labels, class_labels, valid = _random_case(0, (3, 1))
    batch = {"pixel_values": np.zeros((B, 4, 4, 3), np.float32), "mask_labels": mask_labels, "label_valid": valid}
    state = TrainState.create(params, tx, 0)

    good_state, good = step(state, dict(batch, class_labels=class_labels))
    assert int(good["invalid_labels"]) == 0 and np.isfinite(float(good["loss"]))
    loss_terms = [float(v) for k, v in good.items() if k.startswith("loss_")]
    np.testing.assert_allclose(float(good["loss"]), sum(loss_terms), rtol=1e-6)

    bad_state, bad = step(state, dict(batch, class_labels=_with_label(class_labels, 1, 0, 7)))
    assert int(bad["invalid_labels"]) == 1 and np.isnan(float(bad["loss"]))
    for leaf in jax.tree.leaves(bad_state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_loss_under_jit_without_label_valid_equals_all_valid():
    """``label_valid=None`` (all valid) under jit with concrete labels: the label check reads the
    given None, not the traced all-True default. Oracle: the same loss with label_valid given."""
    rng = np.random.default_rng(0)
    class_logits = jnp.asarray(rng.normal(size=(1, 3, NUM_LABELS + 1)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(1, 3, 4, 4)), jnp.float32)
    masks = jnp.asarray(rng.uniform(size=(1, 2, 16, 16)) > 0.5, jnp.float32)
    labels = jnp.asarray([[1, 3]])
    key = jax.random.key(0)
    without = jax.jit(lambda c, m: mask2former_loss(c, m, masks, labels, config=CONFIG, key=key)["loss"])(
        class_logits, logits)
    given = mask2former_loss(class_logits, logits, masks, labels, jnp.ones((1, 2), bool), config=CONFIG,
                             key=key)["loss"]
    np.testing.assert_allclose(without, given, rtol=1e-6)
