"""fusion.py: the final ranking over each probe's candidates and the influence estimate, on numbers worked by hand;
the one :class:`Ranking` that makes the final columns and says what they mean (the terminal, HTML and report views
show its words); and the settings that change a result, each of which makes a rerun into the same output refused."""

from __future__ import annotations

import copy
import html
import json
import re

import numpy as np
import pandas as pd
import pytest

from hf_mirror.fusion import Ranking, fuse, hybrid_scores, influence, scaled_sum


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


# ------------------------------------------------------------------------------ Ranking: one owner of the final columns
HYBRID = Ranking(rank_by="hybrid", mirror_weight=0.5, lexical_weight=0.25)
BY_MIRROR = Ranking(rank_by="mirror", mirror_weight=0.5, lexical_weight=0.25)


def test_ranking_computes_the_final_columns_from_named_inputs():
    bm25, mirror = np.array([4.0, 4.0, 2.0, 0.0]), np.array([1.0, 3.0, 2.0, -1.0])
    assert np.array_equal(HYBRID.scores(bm25=bm25, mirror=mirror), hybrid_scores(bm25, mirror, 0.5))
    assert np.array_equal(BY_MIRROR.scores(bm25=bm25, mirror=mirror), mirror)  # the mirror alone
    assert np.array_equal(HYBRID.influence(mirror=mirror, bm25=bm25), influence(mirror, bm25, 0.25))
    spreads = ([1.0, 2.0, 0.0, 1.0], [0.5, 0.0, 1.0, 1.0])
    assert np.array_equal(HYBRID.influence(mirror=mirror, bm25=bm25, mirror_spread=spreads[0], bm25_spread=spreads[1]),
                          scaled_sum(mirror, bm25, 0.25, *spreads))
    frame = pd.DataFrame({"probe_id": ["a", "a", "a", "b", "b"], "bm25": [1.0, 2.0, np.nan, 10.0, 5.0],
                          "mirror": [0.3, 0.1, 99.0, -1.0, 1.0]})
    pd.testing.assert_series_equal(HYBRID.score_column(frame), fuse(frame, 0.5))
    assert np.array_equal(BY_MIRROR.score_column(frame), frame["mirror"])
    assert (HYBRID.hybrid, HYBRID.mirror_column, BY_MIRROR.hybrid, BY_MIRROR.mirror_column) == (
        True, "mirror", False, "score")


def test_ranking_is_built_from_the_config_or_the_recorded_settings():
    from hf_mirror.config import RankingConfig, ScanConfig

    scan = ScanConfig(ranking=RankingConfig(rank_by="mirror", mirror_weight=0.5, lexical_weight=0.25))
    assert Ranking.from_config(scan) == BY_MIRROR == Ranking.from_settings(
        {"rank_by": "mirror", "mirror_weight": 0.5, "lexical_weight": 0.25})
    assert Ranking.from_config(ScanConfig()) == Ranking(rank_by="hybrid", mirror_weight=0.0, lexical_weight=0.0)
    old = Ranking.from_settings({})  # a run that recorded none of them: ranked by the mirror, no weight guessed
    assert old == Ranking(rank_by="mirror", mirror_weight=None, lexical_weight=None)
    with pytest.raises(ValueError, match="not recorded"):
        Ranking.from_settings({"rank_by": "hybrid"}).scores(bm25=[1.0], mirror=[1.0])
    with pytest.raises(ValueError, match="rank_by"):
        Ranking(rank_by="bm25", mirror_weight=0.0, lexical_weight=0.0)
    with pytest.raises(TypeError):
        Ranking("hybrid", 0.0, 0.0)  # keyword-only


def test_describe_names_the_weights_or_says_they_were_not_recorded():
    words = HYBRID.describe("7 BM25 candidates")
    assert "+ 0.5 x the mirror's score, standardised over the probe's 7 BM25 candidates" in words.score
    assert words.order.endswith("over the probe's 7 BM25 candidates, + 0.5 x the mirror's z-score")
    assert "influence = mirror / sd + 0.25 x BM25 / sd" in words.influence
    bm25_order = Ranking(rank_by="hybrid", mirror_weight=0.0, lexical_weight=0.0).describe("7 BM25 candidates")
    assert "x the mirror" not in bm25_order.score + bm25_order.order and "no BM25 prior" in bm25_order.influence
    unknown = Ranking.from_settings({"rank_by": "hybrid"}).describe()
    assert all("not recorded" in text for text in unknown) and not re.search(r"\d x", "".join(unknown))


def _legend_config(**scan) -> dict:
    return {"scan": {"rank_by": "hybrid", "normalize": "none", **scan}, "mirror": {"direction": "unlearn"},
            "retrieval": {"retrievers": ["bm25"], "per_probe": 7}}


@pytest.mark.parametrize("weights", [{"mirror_weight": 0.3, "lexical_weight": 0.7}, {}])
def test_the_terminal_legend_is_the_rankings_description(weights):
    from hf_mirror.render import score_meaning

    config = _legend_config(**weights)
    words = Ranking.from_settings(config["scan"]).describe("7 BM25 candidates")
    legend = score_meaning(config)
    assert legend.startswith(words.score + "; ") and words.influence in legend


# ------------------------------------------------------------------------------ the settings that change a result
# one value other than the default for every ScanConfig field marked changes_result (a newly marked field needs one)
CHANGED = {"top_k": 3, "normalize": "zscore", "controls": 1, "min_pool": 3, "max_new_tokens": 4, "candidates": 5,
           "aggregate": "sum", "rank_by": "mirror", "mirror_weight": 0.5, "lexical_weight": 0.5,
           "retrievers": ["bm25", "dense"], "read": "forward", "exact_head": 0}


def _marked() -> tuple[str, ...]:
    from hf_mirror.config import ScanConfig, result_fields

    return result_fields(ScanConfig)


def test_every_marked_field_has_a_changed_value_and_the_identity_keeps_old_runs_keys():
    from hf_mirror.config import RankingConfig, ScanConfig, flat_config, result_settings

    assert set(_marked()) == set(CHANGED)
    defaults = flat_config(ScanConfig())
    assert all(CHANGED[k] != defaults[k] for k in CHANGED)
    # the fields added after runs were recorded are keyed only away from their default: older outputs keep theirs
    assert set(result_settings(ScanConfig())) == set(CHANGED) - {"lexical_weight", "retrievers"}
    assert result_settings(ScanConfig(ranking=RankingConfig(lexical_weight=0.5)))["lexical_weight"] == 0.5


@pytest.fixture(scope="module")
def finished(planted, tiny_model, tmp_path_factory):
    """A finished default run over a few documents, with an index that has dense vectors (for --retrievers)."""
    from hf_mirror import ScanConfig, attribute
    from hf_mirror.corpus import Corpus
    from hf_mirror.flags import nested_config
    from hf_mirror.retrieval import build_index

    model, tok = tiny_model
    root = tmp_path_factory.mktemp("ranking")
    corpus_file = root / "corpus.jsonl"
    texts = [*planted.texts[:8], *planted.texts[-4:]]
    corpus_file.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    corpus = Corpus(str(corpus_file), id_column="id")
    build_index(corpus, tok, root / "index", n=4, model=model)

    def run(overwrite: bool = False, **changed):
        scan = nested_config(ScanConfig, {"index": str(root / "index"), "cache": False, **changed})  # flat names
        return attribute(model, corpus, planted.probes()[:2], tokenizer=copy.deepcopy(tok), scan=scan,
                         output_dir=root / "run", show_progress=False, overwrite=overwrite)

    return run(), run, root / "run"


@pytest.mark.parametrize("field", _marked())
def test_a_rerun_with_one_marked_field_changed_is_refused(finished, field):
    from hf_mirror import InputError

    _, run, out = finished
    # read forward also drops exact_head from the identity (the forward read is exact): it is named beside read
    with pytest.raises(InputError, match=rf"holds a different run \(finished\): settings \(([^)]*, )?{field}: "):
        run(**{field: CHANGED[field]})
    assert json.loads((out / "hf_mirror.json").read_text())["done"]  # the finished run is left as it was


def test_the_default_identity_has_no_late_keys_and_an_unmarked_field_reruns(finished):
    result, run, out = finished
    settings = json.loads((out / "hf_mirror.json").read_text())["run"]["settings"]
    assert "lexical_weight" not in settings and "retrievers" not in settings  # identities of older outputs hold
    again = run(batch_size=3)  # only how fast it is made: not refused
    pd.testing.assert_frame_equal(again.topk, result.topk)


def test_the_views_show_the_rankings_description(finished):
    from hf_mirror.html import render_html
    from hf_mirror.render import candidates_phrase, format_result
    from hf_mirror.report import REPORT

    result, _, out = finished
    words = Ranking.from_settings(result.config["scan"]).describe(candidates_phrase(result.config))
    assert "20 BM25 candidates" in words.score  # the run's own numbers
    text = format_result(result, color=False)
    assert words.score in text and words.influence in text
    assert html.escape(words.score) in render_html(result) and html.escape(words.influence) in render_html(result)
    assert html.escape(words.order) in (out / REPORT).read_text(encoding="utf-8")
