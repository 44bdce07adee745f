"""Property tests: random small corpora and probes never crash the scan, and every document is scored once."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_mirror import InputError, MirrorConfig, RankingConfig, ScanConfig, ScoringConfig, WindowConfig, attribute

words = st.text(alphabet=string.ascii_lowercase + " .,\n", min_size=0, max_size=60)
docs = st.lists(words, min_size=1, max_size=8)
ids = st.lists(
    st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=8),
    min_size=1,
    max_size=8,
    unique=True,
)
probes = st.lists(
    st.tuples(
        st.text(alphabet=string.ascii_lowercase + " ", max_size=20),
        st.text(alphabet=string.ascii_lowercase + " .", min_size=0, max_size=20),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    texts=docs,
    doc_ids=ids,
    probe_specs=probes,
    max_length=st.integers(4, 32),
    normalize=st.sampled_from(["none", "zscore"]),
)
def test_scan_scores_each_nonempty_document_once(
    tiny_model, tmp_path_factory, texts, doc_ids, probe_specs, max_length, normalize
):
    model, tok = tiny_model
    n = min(len(texts), len(doc_ids))
    corpus = [{"id": doc_ids[i], "text": texts[i]} for i in range(n)]
    probe_list = [
        {"id": f"q{i}.{j}", "prompt": p, "completion": c}
        for j, (i, (p, c)) in enumerate(zip(range(len(probe_specs)), probe_specs, strict=True))
    ]
    from hf_mirror import Corpus

    try:
        result = attribute(
            model,
            Corpus(corpus, id_column="id"),
            probe_list,
            tokenizer=tok,
            output_dir=tmp_path_factory.mktemp("prop"),
            show_progress=False,
            mirror=MirrorConfig(fit="steps", steps=1),
            scan=ScanConfig(windows=WindowConfig(max_length=max_length, overlap=2),
                            scoring=ScoringConfig(normalize=normalize),
                            ranking=RankingConfig(rank_by="mirror", top_k=3)),
        )
    except InputError as e:  # the only acceptable failures are clear input errors
        message = str(e)
        assert any(s in message for s in ("empty completion", "context window", "at least 3")) or (
            "has an empty text" in message and not any(d["text"].strip() for d in corpus)), message
        return
    nonempty = {d["id"] for d in corpus if d["text"].strip()}
    scores = result.scores()
    assert set(scores["doc_id"]) == nonempty
    assert (scores.groupby("doc_id").size() == len(probe_list)).all() if nonempty else scores.empty
    assert {s["doc_id"] for s in result.skipped} == {d["id"] for d in corpus} - nonempty
    for p in probe_list:
        top = result.top(p["id"])
        assert set(top["doc_id"]) <= nonempty and len(top) == min(3, len(nonempty))
