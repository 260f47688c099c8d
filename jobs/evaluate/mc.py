"""Multiple-choice accuracy (the ``mc`` suite), WMDP/MMLU style, scored by log-likelihood like lm-eval.

A record is ``{"question": str, "choices": [str, ...], "answer": int (index of the right choice), ...}``;
every other column except ``id`` is an attribute (``genre``, ``set``, ...), or the suite's ``attributes``
option names them. Each choice is scored by the summed log-likelihood of the continuation
``" " + choice`` after the prompt ``template.format(question=...)``; the prediction is the arg-max
(lm-eval's ``acc``), or the arg-max of the log-likelihood divided by ``len(choice)`` in characters
(lm-eval's ``acc_norm``).

Tokens follow lm-eval's ``HFLM`` so that the two agree on any tokenizer: the context is encoded with the
tokenizer's own special tokens (BOS for Llama-style tokenizers), the whole ``context + continuation``
string likewise, and the continuation is what the whole encoding holds past the context's tokens.
Every (question, choice) pair is one row of a right-padded batch (``jobs.data.format.collate``), sorted
by length: one forward pass per ``batch_size`` pairs, no per-example Python loop around the model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jobs.data.format import DEFAULT_TEMPLATE, IGNORE_INDEX, PromptLike, as_format, prompt_text
from jobs.data.rows import check_mc_rows
from jobs.evaluate.suites import SuiteContext, register_suite

MC_FIELDS = ("question", "choices", "answer")
NON_ATTRIBUTES = ("id", *MC_FIELDS)


# ----------------------------------------------------------------------------------------- records


def check_mc_records(records: Sequence[dict], label: str = "mc") -> list[dict]:
    """The records if every one has a non-empty string ``question``, a list of >= 2 non-empty string
    ``choices`` and an int ``answer`` indexing them; ``DataError`` (a ``ValueError``) naming the first bad
    row (1-based) and what was expected otherwise (``jobs.data.rows.check_mc_rows``)."""
    return check_mc_rows(records, label)


def attribute_columns(records: Sequence[dict], attributes: Optional[Sequence[str]] = None) -> list[str]:
    """The attribute columns: ``attributes`` if given, else every column with scalar (str/int/bool) values
    in all records, other than id/question/choices/answer, in first-seen order."""
    if attributes is not None:
        return list(attributes)
    cols: dict[str, None] = {}
    for r in records:
        for k in r:
            cols.setdefault(k, None)
    return [c for c in cols if c not in NON_ATTRIBUTES and all(isinstance(r.get(c), (str, int, bool)) for r in records)]


# ----------------------------------------------------------------------------------------- scoring


def encode_pair(tokenizer: Any, context: str, continuation: str, chat: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for causal models: trailing spaces move from the context to the
    continuation; ``whole = encode(context + continuation)``, ``ctx = encode(context)`` (tokenizer's
    special tokens included, or none for a rendered chat prompt, which holds its own), continuation tokens
    ``whole[len(ctx):]``."""
    n = len(context) - len(context.rstrip())
    if n and not chat:  # a chat prompt's trailing newline belongs to the template's generation prompt
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=not chat)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=not chat)["input_ids"]
    return ctx, whole[len(ctx) :]


def loglikelihoods(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 32,
    max_length: int = 2048,
    chat: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability (nats) of each continuation given its context, and its token count.

    Pairs are encoded with :func:`encode_pair`, left-truncated to ``max_length`` tokens (the context
    loses its start, as in lm-eval), right-padded and scored ``batch_size`` at a time, longest first.
    Returns float64 and int64 arrays in the input order.
    """
    from jobs.evaluate.scoring import encoded_nll

    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts for {len(continuations)} continuations")
    encoded = []
    for c, x in zip(contexts, continuations):
        ctx, cont = encode_pair(tokenizer, c, x, chat)
        if not cont:
            raise ValueError(f"continuation {x!r} has no tokens after context {c!r}")
        ids, labels = (ctx + cont)[-max_length:], ([IGNORE_INDEX] * len(ctx) + cont)[-max_length:]
        encoded.append({"input_ids": ids, "labels": labels})
    nll, n = encoded_nll(model, tokenizer, encoded, batch_size)
    return -nll, n


def choice_loglikelihoods(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    template: PromptLike = DEFAULT_TEMPLATE,
    batch_size: int = 32,
    max_length: int = 2048,
) -> list[np.ndarray]:
    """Per record, the log-likelihood of each of its choices (all pairs of all records batched together).
    With a chat format the context is the rendered chat prompt and the continuation the bare choice."""
    fmt = as_format(template)
    contexts = [prompt_text(tokenizer, r["question"], fmt) for r in records for _ in r["choices"]]
    conts = [("" if fmt.chat else " ") + c for r in records for c in r["choices"]]
    ll, _ = loglikelihoods(model, tokenizer, contexts, conts, batch_size, max_length, chat=fmt.chat)
    out, pos = [], 0
    for r in records:
        out.append(ll[pos : pos + len(r["choices"])])
        pos += len(r["choices"])
    return out


def mc_correct(lls: Sequence[np.ndarray], records: Sequence[dict], norm: bool = False) -> np.ndarray:
    """1.0 where the arg-max choice (of ``ll``, or ``ll / len(choice)`` with ``norm``) is the answer.
    Ties go to the first choice (``np.argmax``), as in lm-eval."""
    out = np.zeros(len(records))
    for i, (ll, r) in enumerate(zip(lls, records)):
        score = np.asarray(ll, dtype=np.float64)
        if norm:
            score = score / np.array([float(len(c)) for c in r["choices"]])
        out[i] = float(int(np.argmax(score)) == int(r["answer"]))
    return out


def accuracy_by_attribute(
    correct: Sequence[float], records: Sequence[dict], attributes: Sequence[str], prefix: str = "mc_acc"
) -> dict[str, float]:
    """``{prefix}`` overall and ``{prefix}.<attribute>.<value>`` for every value of every attribute
    (records without the attribute are left out of its groups)."""
    c = np.asarray(correct, dtype=np.float64)
    out = {prefix: float(c.mean()) if c.size else float("nan")}
    for a in attributes:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            if r.get(a) is not None:
                groups.setdefault(str(r[a]), []).append(i)
        for v, idx in groups.items():
            out[f"{prefix}.{a}.{v}"] = float(c[idx].mean())
    return out


class McOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attributes: Optional[list[str]] = Field(
        None,
        description="attribute columns for mc_acc.<attribute>.<value> (default: every column but "
        "id, question, choices, answer)",
    )
    split: str = Field("mc", description="the split holding the multiple-choice rows")


@register_suite("mc", needs=("mc",), options=McOptions, groups=(("MC", r"^mc_"),))
def mc_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: McOptions) -> dict:
    """Multiple-choice accuracy on the ``mc`` split.

    Metrics: ``mc_acc`` (lm-eval ``acc``), ``mc_acc_norm`` (lm-eval ``acc_norm``) and
    ``mc_acc.<attribute>.<value>`` per attribute value (see :func:`attribute_columns`). ``raw``:
    ``mc_correct`` (0/1 per record, input order) and ``mc_loglikelihoods`` (per record, per choice).
    Sequences longer than ``max_length`` tokens lose the start of their context.
    """
    records = data.get(opts.split)
    if not records:
        raise ValueError(f"the 'mc' suite needs a non-empty {opts.split!r} split (data.mc); got {sorted(data)}")
    records = check_mc_records(records, f"split {opts.split!r}")
    lls = choice_loglikelihoods(ctx.model, ctx.tokenizer, records, ctx.template, ctx.batch_size, ctx.max_length)
    correct = mc_correct(lls, records)
    metrics = accuracy_by_attribute(correct, records, attribute_columns(records, opts.attributes))
    metrics["mc_acc_norm"] = float(mc_correct(lls, records, norm=True).mean())
    raw = {"mc_correct": correct.tolist(), "mc_loglikelihoods": [ll.tolist() for ll in lls]}
    return {"metrics": metrics, "raw": raw}
