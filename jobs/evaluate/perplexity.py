"""Perplexity on general text (the ``perplexity`` suite).

Every text record (``{"text": ...}``) is encoded like the general corpus in training
(:func:`jobs.data.format.encode_text`: the tokenizer's own BOS if it adds one, text, EOS; cut to ``max_length``);
every token after the
first is a target. Perplexity is corpus-level, ``exp(total NLL / total target tokens)`` over the split,
as lm-eval's ``word_perplexity`` aggregates (but per token). Batched: right-padded rows with an
attention mask, ``batch_size`` per forward pass, longest first.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from jobs.evaluate.suites import NoOptions, SuiteContext, register_suite


def text_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32, max_length: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) of each text's tokens (``encode_text``) and its number of target tokens."""
    from jobs.data.format import encode_text
    from jobs.evaluate.scoring import encoded_nll

    return encoded_nll(model, tokenizer, [encode_text(tokenizer, t, max_length) for t in texts], batch_size)


def corpus_perplexity(nll: Sequence[float], n_tokens: Sequence[int]) -> float:
    """``exp(sum(nll) / sum(n_tokens))``; NaN when there are no tokens."""
    total = float(np.sum(n_tokens))
    return math.exp(float(np.sum(nll)) / total) if total > 0 else float("nan")


def is_text_split(records: Sequence[dict]) -> bool:
    """Records that are all ``{"text": str, ...}`` without a ``question``."""
    from jobs.data.loading import is_text_record

    return bool(records) and all(is_text_record(r) for r in records)


@register_suite("perplexity", needs=("general",), groups=(("Utility", r"^(.*perplexity.*|.*_ppl)$"),))
def perplexity_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: NoOptions) -> dict:
    """``{split}_ppl`` for every text split (``general_ppl`` for ``data.general``); ``raw``:
    ``{split}_nll`` and ``{split}_tokens`` per record, so perplexities can be re-aggregated."""
    splits = {s: r for s, r in data.items() if is_text_split(r)}
    if not splits:
        raise ValueError(
            f"the 'perplexity' suite needs a text split such as 'general' (data.general, records "
            f"with a 'text' field); got {sorted(data)}"
        )
    metrics: dict[str, float] = {}
    raw: dict[str, list] = {}
    for split, records in splits.items():
        nll, n = text_nll(ctx.model, ctx.tokenizer, [r["text"] for r in records], ctx.batch_size, ctx.max_length)
        metrics[f"{split}_ppl"] = corpus_perplexity(nll, n)
        raw[f"{split}_nll"], raw[f"{split}_tokens"] = nll.tolist(), n.tolist()
    return {"metrics": metrics, "raw": raw}
