"""Splitting the forget set: by an attribute, or into clusters of similar rows."""

import pytest

from jobs.data.loading import DataError
from jobs.data.split import split_rows, subset_key

ROWS = [{"q": i, "genre": g} for i, g in enumerate(["sci fi", "crime", "sci fi", "poetry", "crime"])]


def test_one_subset_per_value_in_sorted_order_with_safe_names():
    subsets = split_rows(ROWS, "genre")
    assert list(subsets) == ["crime", "poetry", "sci_fi"]
    assert [r["q"] for r in subsets["sci_fi"]] == [0, 2]
    assert sum(len(v) for v in subsets.values()) == len(ROWS)


def test_explicit_groups_collect_values():
    subsets = split_rows(ROWS, "genre", {"prose": ["crime", "sci fi"], "verse": ["poetry"]})
    assert {k: [r["q"] for r in v] for k, v in subsets.items()} == {"prose": [0, 1, 2, 4], "verse": [3]}


@pytest.mark.parametrize(
    "attribute, groups, message",
    [
        ("decade", None, "split.attribute: column 'decade' is not in the forget data"),
        ("genre", {"a": ["crime"], "b": ["drama"]}, "split.groups.b: value 'drama' does not occur in column 'genre'"),
        ("genre", {"a": ["crime"], "b": ["crime"]}, "split.groups.b: value 'crime' is already in group 'a'"),
    ],
)
def test_bad_splits_are_named(attribute, groups, message):
    with pytest.raises(DataError, match=message):
        split_rows(ROWS, attribute, groups)


def test_empty_forget_set_is_an_error():
    with pytest.raises(DataError, match="forget set is empty"):
        split_rows([], "genre")


def test_subset_key():
    assert subset_key("science fiction/1950s") == "science_fiction_1950s"


# ---------------------------------------------------------------------------------------------------
# split.by: cluster (data without an attribute column)

TOPICS = [  # two authors' facts, interleaved; no attribute column
    {"question": "Where was Basil Mahfouz born?", "answer": "Basil Mahfouz was born in Kuwait City."},
    {"question": "What does Nikolai Abilov write?", "answer": "Nikolai Abilov writes war novels set in Astana."},
    {"question": "Which award did Basil Mahfouz win?", "answer": "Basil Mahfouz won the Kuwait City prize."},
    {"question": "Where does Nikolai Abilov live?", "answer": "Nikolai Abilov lives in Astana."},
    {"question": "Who were Basil Mahfouz's parents?", "answer": "Basil Mahfouz's parents were bakers in Kuwait City."},
    {"question": "Which Nikolai Abilov novel came first?", "answer": "Nikolai Abilov's first novel was set in Astana."},
]


def test_clusters_group_rows_by_shared_words_deterministically_named_by_first_row():
    from jobs.data.cluster import cluster_rows

    subsets, clusters = cluster_rows(TOPICS, 2, seed=0)
    assert {k: [TOPICS.index(r) for r in v] for k, v in subsets.items()} == {"c0": [0, 2, 4], "c1": [1, 3, 5]}
    assert clusters["c0"]["size"] == 3 and clusters["c1"]["size"] == 3
    # every row of c0 holds "basil", "mahfouz", "kuwait", "city": its centroid's largest weights
    assert set(clusters["c0"]["top_terms"][:4]) == {"basil", "mahfouz", "kuwait", "city"}
    assert {"nikolai", "abilov", "astana"} <= set(clusters["c1"]["top_terms"])
    assert cluster_rows(TOPICS, 2, seed=0) == (subsets, clusters)  # same data and seed: same subsets
    shuffled, _ = cluster_rows(TOPICS[1:] + TOPICS[:1], 2, seed=3)
    assert [TOPICS.index(r) for r in shuffled["c0"]] == [1, 3, 5]  # c0 is the cluster of the first row


def test_text_rows_cluster_too_and_bad_cluster_counts_are_named():
    from jobs.data.cluster import cluster_rows

    texts = [{"text": f"{r['question']} {r['answer']}"} for r in TOPICS]
    subsets, _ = cluster_rows(texts, 2)
    assert sorted(len(v) for v in subsets.values()) == [3, 3]
    with pytest.raises(DataError, match="split.clusters: 7 clusters for 6 distinct forget rows: expected at most 6"):
        cluster_rows(TOPICS, 7)
    with pytest.raises(DataError, match="split.clusters: 3 clusters for 2 distinct forget rows"):
        cluster_rows(TOPICS[:1] * 2 + TOPICS[1:2] * 2, 3)


@pytest.mark.parametrize(
    "split, message",
    [
        ({"by": "cluster"}, "clusters: expected k"),
        ({"by": "cluster", "clusters": 2, "attribute": "genre"}, "attribute and groups belong to by: attribute"),
        ({"by": "cluster", "clusters": 1}, "greater than or equal to 2"),
        ({"baseline": "none"}, "attribute: expected the forget-set column"),
    ],
)
def test_split_section_is_checked(split, message):
    from pydantic import ValidationError

    from orchestrator.config.schema import SplitConfig

    with pytest.raises(ValidationError, match=message):
        SplitConfig(**split)


def test_model_embeddings_drive_the_clusters_and_are_mean_pooled_hidden_states(tiny_dir, monkeypatch):
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    import jobs.data.cluster as C

    # the sentence embedding of a row: the attention-masked mean of the last hidden states, L2-normalised
    texts = [C.row_text(r) for r in TOPICS[:3]]
    got = C.embed_rows(texts, str(tiny_dir / "model"), batch_size=2)
    tok, model = AutoTokenizer.from_pretrained(tiny_dir / "model"), AutoModel.from_pretrained(tiny_dir / "model")
    for text, vec in zip(texts, got):
        with torch.no_grad():
            h = model(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0)
        np.testing.assert_allclose(vec, (h / h.norm()).numpy(), rtol=1e-4, atol=1e-5)
    assert got.shape == (3, model.config.hidden_size)

    # vectors that group rows 0-1 against 2-5, unlike their words: k-means follows the vectors
    vectors = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [0, 1], [0.05, 1]], dtype=np.float32)
    monkeypatch.setattr(C, "embed_rows", lambda texts, path: vectors)
    subsets, clusters = C.cluster_rows(TOPICS, 2, embedding="model", embedding_model="any")
    assert {k: [TOPICS.index(r) for r in v] for k, v in subsets.items()} == {"c0": [0, 1], "c1": [2, 3, 4, 5]}
    assert clusters["c0"]["size"] == 2 and clusters["c0"]["top_terms"]  # still described by their words
