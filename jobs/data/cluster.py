"""Splitting a forget set that has no attribute column (TOFU, MUSE) into k clusters of similar rows.

``split.by: cluster``: each forget row (question and answer, or its text) becomes a vector, and
scikit-learn's ``KMeans`` (``random_state`` = ``split.seed``, 10 starts) assigns every row to one of k
clusters. The vector (``split.embedding``):

- ``model``: a sentence embedding, the attention-masked mean of a transformer's last hidden states,
  L2-normalised (sentence-transformers' mean pooling): ``split.embedding_model``, a sentence encoder folder
  or hub name such as ``sentence-transformers/all-MiniLM-L6-v2``, by default the pipeline's own model. It
  runs where the split runs (the driver, and ``spunge validate``): a small encoder is the right choice
  for a 7B pipeline.
- ``tfidf`` (default): TF-IDF over the row's words (English stop words left out, sublinear term
  frequency, L2-normalised): no model at all, exact to reproduce; it groups rows by the words they share
  (names, places, topics).

On L2-normalised vectors k-means groups by cosine similarity. The subsets are ``c0`` ... ``c<k-1>``,
numbered in the order of their first row, so the same data, vectors and seed give the same subsets with
the same names. Each cluster is described by its size and its top terms (the largest mean TF-IDF weights
of its rows, whichever vector clustered them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from jobs.data import DataError

if TYPE_CHECKING:
    import numpy as np


def row_text(row: dict) -> str:
    """What a row is about: its question and answer, or its text."""
    if isinstance(row.get("text"), str):
        return row["text"]
    return f"{row.get('question', '')} {row.get('answer', '')}"


def embed_rows(texts: list[str], model_path: str, batch_size: int = 16, max_length: int = 256) -> "np.ndarray":
    """Sentence embeddings ``[N, H]``: the attention-masked mean of the model's last hidden states (the base
    transformer of a causal LM), L2-normalised; float32 on the CPU, in input order."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
    return np.concatenate(out)


def cluster_rows(
    rows: list[dict],
    k: int,
    seed: int = 0,
    label: str = "data.forget",
    top_terms: int = 5,
    embedding: str = "tfidf",
    embedding_model: Optional[str] = None,
) -> tuple[dict[str, list[dict]], dict[str, dict[str, Any]]]:
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
        raise DataError(
            f"split.clusters: {k} clusters for {distinct} distinct forget rows: expected at most {distinct}"
        )
    vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True)
    try:
        tfidf = vectorizer.fit_transform(texts)
    except ValueError:  # every word a stop word, or no word at all
        raise DataError(f"{label}: no words to cluster the forget rows by (split.by: cluster)") from None
    if embedding == "model":
        if not embedding_model:
            raise ValueError("split.embedding: model needs an embedding model folder or hub name")
        x = embed_rows(texts, embedding_model)
    else:
        x = tfidf
    labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(x).labels_
    order = list(dict.fromkeys(int(c) for c in labels))  # clusters by their first row
    if len(order) < k:
        raise DataError(
            f"split.clusters: the forget rows form only {len(order)} distinct groups, not {k}: ask for fewer clusters"
        )
    terms = vectorizer.get_feature_names_out()
    subsets: dict[str, list[dict]] = {}
    clusters: dict[str, dict[str, Any]] = {}
    for n, c in enumerate(order):
        name = f"c{n}"
        members = np.flatnonzero(labels == c)
        subsets[name] = [rows[i] for i in members]
        weight = np.asarray(tfidf[members].mean(axis=0)).ravel()
        top = [str(terms[i]) for i in np.argsort(-weight, kind="stable")[:top_terms] if weight[i] > 0]
        clusters[name] = {"size": len(members), "top_terms": top}
    return subsets, clusters
