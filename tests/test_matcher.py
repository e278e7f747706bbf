"""Hungarian assignment and matcher; oracle: scipy.optimize.linear_sum_assignment (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from m2f_jax.modeling.matcher import (
    hungarian_assignment,
    hungarian_matcher,
    invert_matching,
    matching_to_indices,
)

assign_jit = jax.jit(hungarian_assignment)


def _check_valid_assignment(target_to_query, valid, num_queries):
    """Distinct queries in range, padded slots unmatched, min(Q, N_valid) pairs."""
    t2q = np.asarray(target_to_query)
    assert np.all(t2q[~valid] == -1)
    matched = t2q[t2q >= 0]
    assert np.all(matched < num_queries)
    assert len(np.unique(matched)) == len(matched)
    assert len(matched) == min(num_queries, int(valid.sum()))


def _our_cost(cost, target_to_query):
    t2q = np.asarray(target_to_query)
    slots = np.nonzero(t2q >= 0)[0]
    return cost[t2q[slots], slots].sum()


def _scipy_cost(cost, valid):
    sub = cost[:, valid]
    rows, cols = linear_sum_assignment(sub)
    return sub[rows, cols].sum()


@pytest.mark.parametrize("shape", [(7, 7), (10, 6), (4, 9)])
def test_assignment_optimal_like_scipy_square_and_rectangular(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        cost = rng.normal(size=shape).astype(np.float32)
        valid = np.ones(shape[1], bool)
        t2q = assign_jit(jnp.asarray(cost), jnp.asarray(valid))
        _check_valid_assignment(t2q, valid, shape[0])
        np.testing.assert_allclose(
            _our_cost(cost.astype(np.float64), t2q), _scipy_cost(cost.astype(np.float64), valid),
            rtol=1e-5, atol=1e-5,
        )


@pytest.mark.parametrize("shape", [(10, 6), (4, 9)])
def test_assignment_padded_targets_never_matched_and_optimal_on_valid(shape):
    """Q > M, and Q < M with N_valid both below and above Q; padding scattered among valid."""
    rng = np.random.default_rng(shape[0])
    num_queries, num_slots = shape
    for _ in range(6):
        cost = rng.normal(size=shape).astype(np.float32)
        valid = rng.random(num_slots) < 0.6
        # Make padded slots attractive: a naive assignment would pick them.
        cost[:, ~valid] = -100.0
        t2q = assign_jit(jnp.asarray(cost), jnp.asarray(valid))
        _check_valid_assignment(t2q, valid, num_queries)
        if valid.any():
            np.testing.assert_allclose(
                _our_cost(cost.astype(np.float64), t2q),
                _scipy_cost(cost.astype(np.float64), valid),
                rtol=1e-5, atol=1e-5,
            )


def test_assignment_no_valid_target():
    t2q = assign_jit(jnp.ones((10, 6)), jnp.zeros(6, bool))
    np.testing.assert_array_equal(t2q, -1)


@pytest.mark.parametrize("shape", [(10, 6), (4, 9)])
def test_assignment_nonfinite_costs_finite_result_like_scipy_with_big_value(shape):
    """nan/inf never crash or hang; they are used only when unavoidable (transformers #21644)."""
    rng = np.random.default_rng(7 + shape[0])
    cost = rng.random(shape).astype(np.float32)
    bad = rng.random(shape) < 0.3
    bad[0, :] = True  # a whole row (one broken query)
    cost[bad] = rng.choice([np.nan, np.inf, -np.inf], size=bad.sum())
    valid = np.ones(shape[1], bool)
    t2q = assign_jit(jnp.asarray(cost), jnp.asarray(valid))
    _check_valid_assignment(t2q, valid, shape[0])
    # Oracle: scipy with every non-finite entry replaced by a value above any sum of finite costs.
    big = np.where(np.isfinite(cost), cost, 1e6).astype(np.float64)
    np.testing.assert_allclose(_our_cost(big, t2q), _scipy_cost(big, valid), rtol=1e-6)


def test_assignment_all_nonfinite():
    cost = jnp.full((10, 6), jnp.nan, jnp.float32).at[1, 1].set(jnp.inf)
    t2q = assign_jit(cost, jnp.ones(6, bool))
    _check_valid_assignment(t2q, np.ones(6, bool), 10)


def test_assignment_batched_vmap_and_jit_like_scipy():
    rng = np.random.default_rng(3)
    cost = rng.normal(size=(2, 3, 10, 6)).astype(np.float32)
    valid = rng.random((2, 3, 6)) < 0.7
    # vmap over the first axis, the function's own batching over the second.
    batched = jax.jit(jax.vmap(hungarian_assignment))(jnp.asarray(cost), jnp.asarray(valid))
    for i in range(2):
        for j in range(3):
            _check_valid_assignment(batched[i, j], valid[i, j], 10)
            if valid[i, j].any():
                np.testing.assert_allclose(
                    _our_cost(cost[i, j].astype(np.float64), batched[i, j]),
                    _scipy_cost(cost[i, j].astype(np.float64), valid[i, j]),
                    rtol=1e-5, atol=1e-5,
                )


def test_assignment_bad_shapes_raise():
    with pytest.raises(ValueError, match="target_valid must have shape"):
        hungarian_assignment(jnp.zeros((2, 5, 3)), jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"\(\.\.\., Q, M\)"):
        hungarian_assignment(jnp.zeros((5,)))


def test_invert_matching_and_hf_indices_hand_made():
    t2q = jnp.array([[4, -1, 0], [-1, -1, -1]], jnp.int32)
    np.testing.assert_array_equal(
        invert_matching(t2q, 5), [[2, -1, -1, -1, 0], [-1, -1, -1, -1, -1]]
    )
    from m2f_jax.modeling.matcher import Matching

    (rows0, cols0), (rows1, cols1) = matching_to_indices(Matching(t2q, invert_matching(t2q, 5)))
    np.testing.assert_array_equal(rows0, [0, 4])  # sorted by query, as scipy returns them
    np.testing.assert_array_equal(cols0, [2, 0])
    assert rows1.size == cols1.size == 0


def test_matcher_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"masks_queries_logits .* must start with \(B, Q\)"):
        hungarian_matcher(
            jnp.zeros((2, 5, 3)), jnp.zeros((2, 4, 8, 8)), jnp.zeros((2, 3, 8, 8)),
            jnp.zeros((2, 3), int), key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="exactly one of"):
        hungarian_matcher(
            jnp.zeros((2, 5, 3)), jnp.zeros((2, 5, 8, 8)), jnp.zeros((2, 3, 8, 8)),
            jnp.zeros((2, 3), int),
        )
