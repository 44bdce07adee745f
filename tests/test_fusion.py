"""fusion.py: the final ranking over each probe's candidates and the influence estimate, on numbers worked by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hf_mirror.fusion import fuse, hybrid_scores, influence, scaled_sum


def test_weight_zero_is_bm25s_order_scaled_to_one():
    bm25, mirror = np.array([2.0, 8.0, 4.0]), np.array([9.0, -1.0, 0.5])
    scores = hybrid_scores(bm25, mirror, 0.0)
    assert np.allclose(scores, [0.25, 1.0, 0.5])
    assert list(np.argsort(-scores)) == list(np.argsort(-bm25))  # the mirror changes nothing


def test_the_mirror_term_is_its_z_score_over_the_candidates():
    bm25, mirror = np.array([4.0, 4.0, 2.0]), np.array([1.0, 3.0, 2.0])
    z = (mirror - mirror.mean()) / mirror.std()
    assert np.allclose(hybrid_scores(bm25, mirror, 0.5), bm25 / 4.0 + 0.5 * z)
    # a lexical tie is broken by the mirror; a clear lexical lead survives a small weight
    scores = hybrid_scores(bm25, mirror, 0.05)
    assert scores[1] > scores[0] > scores[2]
    assert np.allclose(hybrid_scores(bm25, mirror * 1000 + 7, 0.5), hybrid_scores(bm25, mirror, 0.5))  # scale-free


def test_degenerate_inputs_drop_their_term():
    assert np.allclose(hybrid_scores([0.0, 0.0], [1.0, 2.0], 1.0), [-1.0, 1.0])  # no lexical match: the mirror alone
    assert np.allclose(hybrid_scores([1.0, 2.0], [3.0, 3.0], 1.0), [0.5, 1.0])  # no mirror spread: BM25 alone
    assert np.allclose(hybrid_scores([5.0], [3.0], 1.0), [1.0])  # one candidate: no spread
    assert hybrid_scores([], [], 1.0).shape == (0,)


def test_fuse_scores_each_probe_over_its_own_candidates_and_leaves_the_others_nan():
    frame = pd.DataFrame({
        "probe_id": ["a", "a", "a", "b", "b"],
        "bm25": [1.0, 2.0, np.nan, 10.0, 5.0],
        "mirror": [0.3, 0.1, 99.0, -1.0, 1.0],
    })
    out = fuse(frame, 1.0)
    assert np.isnan(out[2])  # not one of a's candidates
    assert np.allclose(out[[0, 1]], hybrid_scores([1.0, 2.0], [0.3, 0.1], 1.0))
    assert np.allclose(out[[3, 4]], hybrid_scores([10.0, 5.0], [-1.0, 1.0], 1.0))  # b's spread, not a's
    assert list(out.index) == list(frame.index)
    assert np.allclose(fuse(frame.rename(columns={"mirror": "m"}), 1.0, mirror="m")[[0, 1, 3, 4]], out[[0, 1, 3, 4]])


def test_influence_is_each_term_over_its_spread():
    mirror, bm25 = np.array([1.0, 2.0, 3.0, 6.0]), np.array([0.0, 4.0, 0.0, 4.0])
    assert np.allclose(influence(mirror, bm25, 0.0), mirror / mirror.std())
    assert np.allclose(influence(mirror, bm25, 0.5), mirror / mirror.std() + 0.5 * bm25 / bm25.std())
    # a probe whose mirror scores are all equal: only the lexical prior is left
    assert np.allclose(influence(np.ones(4), bm25, 2.0), 2.0 * bm25 / bm25.std())


def test_scaled_sum_takes_one_spread_per_row():
    out = scaled_sum([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], 1.0, [1.0, 2.0, 0.0], [0.5, 0.0, 1.0])
    assert np.allclose(out, [2.0 + 2.0, 1.0 + 0.0, 0.0 + 1.0])


@pytest.mark.parametrize("weight", [0.0, 0.05, 1.0])
def test_bm25_scale_does_not_change_the_order(weight):
    rng = np.random.default_rng(0)
    bm25, mirror = rng.uniform(0.1, 5, 12), rng.normal(size=12)
    assert np.allclose(hybrid_scores(bm25 * 37, mirror, weight), hybrid_scores(bm25, mirror, weight))
