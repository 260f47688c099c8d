"""Splitting a forget set that has no attribute column (TOFU, MUSE) into k clusters of similar rows.

``split.by: cluster``: each forget row (question and answer, or its text) becomes a TF-IDF vector over its
words (English stop words left out, sublinear term frequency, rows L2-normalised, so k-means on them
groups rows by cosine similarity); scikit-learn's ``KMeans`` (``random_state`` = ``split.seed``, 10 starts)
assigns every row to one of k clusters. The subsets are ``c0`` ... ``c<k-1>``, numbered in the order of
their first row, so the same data and seed always give the same subsets with the same names. Each cluster
is described by its size and its top terms (the largest weights of its centroid).

TF-IDF is the sentence embedding here: it needs no embedding model (none can be downloaded offline, and a
7B base model on the driver would cost a GPU) and is exact to reproduce; it groups rows by the words they
share (names, places, topics), which is what a per-subset unlearning job needs to be about.
"""

from __future__ import annotations

from typing import Any

from jobs.data import DataError


def row_text(row: dict) -> str:
    """What a row is about: its question and answer, or its text."""
    if isinstance(row.get("text"), str):
        return row["text"]
    return f"{row.get('question', '')} {row.get('answer', '')}"


def cluster_rows(rows: list[dict], k: int, seed: int = 0, label: str = "data.forget",
                 top_terms: int = 5) -> tuple[dict[str, list[dict]], dict[str, dict[str, Any]]]:
    """``(subsets, clusters)``: the rows of each cluster by subset name, and each cluster's ``size`` and
    ``top_terms``. A ``DataError`` naming ``split.clusters`` when there are fewer distinct rows than k."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not rows:
        raise DataError(f"{label}: the forget set is empty")
    texts = [row_text(r) for r in rows]
    distinct = len(set(texts))
    if k > distinct:
        raise DataError(f"split.clusters: {k} clusters for {distinct} distinct forget rows: expected at most "
                        f"{distinct}")
    vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True)
    try:
        x = vectorizer.fit_transform(texts)
    except ValueError:  # every word a stop word, or no word at all
        raise DataError(f"{label}: no words to cluster the forget rows by (split.by: cluster)") from None
    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(x)
    order = list(dict.fromkeys(int(c) for c in km.labels_))  # clusters by their first row
    if len(order) < k:
        raise DataError(f"split.clusters: the forget rows form only {len(order)} distinct groups, not {k}: "
                        f"ask for fewer clusters")
    terms = vectorizer.get_feature_names_out()
    subsets: dict[str, list[dict]] = {}
    clusters: dict[str, dict[str, Any]] = {}
    for n, c in enumerate(order):
        name = f"c{n}"
        subsets[name] = [r for r, lab in zip(rows, km.labels_) if lab == c]
        centroid = km.cluster_centers_[c]
        top = [str(terms[i]) for i in np.argsort(-centroid, kind="stable")[:top_terms] if centroid[i] > 0]
        clusters[name] = {"size": len(subsets[name]), "top_terms": top}
    return subsets, clusters
