"""What each worker trains on at each step: the job's rows encoded once, and a data order that depends on the
seed and the global batch, never on the number of workers.

A step takes ``G`` rows (the global batch, ``micro x accumulation x workers``) of the forget set and ``G`` of
the retain set. The order is one stream per set: epoch ``e`` is a permutation of all its rows drawn by Python's
``random.Random(seed + e)`` (the retain set's with ``seed + 1`` as its seed), and step ``s`` (from 1) takes
positions ``[(s-1) G, s G)`` of the epochs laid end to end, so no global batch is ever cut short by an epoch's
end. Worker ``r`` of ``W`` takes the ``R = G / W`` rows ``[r R, (r+1) R)`` of it, in ``A`` micro batches of ``m``
rows: every worker draws different rows, and one worker with ``A W`` micro batches sees the same global batch
as ``W`` workers with ``A`` each.

Token-averaged losses are made independent of the split the way transformers' Trainer does it
(``num_items_in_batch``): every part of a micro batch carries ``norm``, the global batch's target-token count of
that part divided by ``A W``. ``mean_nll`` divides its summed NLL by it, so DeepSpeed's mean over micro batches
and ranks is the token mean of the whole global batch, and so is the rank mean of the logged value. Every rank
knows every row's tokens, so the counts cost no communication.
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import torch

from jobs.data.format import IGNORE_INDEX, collate, encode_qa, encode_text
from jobs.spec import UnlearnSpec


class BatchSplitError(ValueError):
    """A global batch that the workers or the micro batch cannot split evenly."""


def split_batch(batch_size: int, accumulation: int, global_batch: Optional[int], world: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) of each of ``world`` workers.

    Without a ``global_batch`` they are ``batch_size`` and ``accumulation`` (the global batch grows with the
    workers). With it, each worker takes ``global_batch / world`` rows a step in micro batches of the largest
    size up to ``batch_size`` that divides them. Errors name the ``unlearn.`` field to change."""
    if global_batch is None:
        return batch_size, accumulation
    if accumulation != 1:
        raise BatchSplitError(
            "unlearn.gradient_accumulation_steps: set it or unlearn.global_batch_size, not both "
            "(the accumulation follows from the global batch)"
        )
    if global_batch % world:
        raise BatchSplitError(
            f"unlearn.global_batch_size: {global_batch} rows do not split evenly over {world} "
            f"workers (scaling.num_workers); use a multiple of {world}"
        )
    per_rank = global_batch // world
    micro = max(d for d in range(1, min(batch_size, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def encode_rows(rows: list[dict], tokenizer, spec: UnlearnSpec, part: str, method=None) -> list[dict]:
    """Each row as ``{part: encoding, view: encoding, ...}``; QA rows unless ``part``'s rows are raw text."""
    if (spec.retain_format if part == "retain" else spec.forget_format) == "text":
        return [{part: encode_text(tokenizer, r["text"], spec.max_length)} for r in rows]
    rng = random.Random(spec.seed)
    enc = lambda q, a: encode_qa(tokenizer, q, a, spec.max_length, spec.prompt)
    out = []
    for r in rows:
        views = method.forget_views(r, rng) if method is not None else {}
        out.append({part: enc(r["question"], r["answer"]), **{k: enc(q, a) for k, (q, a) in views.items()}})
    return out


def target_tokens(encoding: dict) -> int:
    """Target tokens of one encoded sequence as ``sequence_nll`` counts them (a label after the first)."""
    return sum(1 for t in encoding["labels"][1:] if t != IGNORE_INDEX)


class RowStream:
    """The rows of one set in the stream order described in the module docstring."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed = rows, seed
        self._perms: dict[int, list[int]] = {}
        self._tokens: dict[str, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # steps move forward: the oldest epoch is done
                del self._perms[min(self._perms)]
            order = list(range(len(self.rows)))
            random.Random(self.seed + epoch).shuffle(order)
            self._perms[epoch] = order
        return self._perms[epoch]

    def indices(self, start: int, stop: int) -> list[int]:
        n = len(self.rows)
        return [self.permutation(p // n)[p % n] for p in range(start, stop)]

    def tokens(self, key: str, indices: list[int]) -> int:
        if key not in self._tokens:
            self._tokens[key] = [target_tokens(r[key]) for r in self.rows]
        return sum(self._tokens[key][i] for i in indices)


class StepBatches:
    """Each worker's micro batches for a step: ``forget`` parts (and the method's views) and ``retain``, collated,
    each part with its ``norm`` (see the module docstring)."""

    def __init__(
        self,
        forget: list[dict],
        retain: Optional[list[dict]],
        seed: int,
        micro: int,
        accum: int,
        rank: int,
        world: int,
        pad_token_id: int,
    ):
        self.forget = RowStream(forget, seed)
        self.retain = RowStream(retain, seed + 1) if retain else None
        self.micro, self.accum, self.rank, self.world, self.pad = micro, accum, rank, world, pad_token_id
        self.size = micro * accum * world

    def epoch(self, step: int) -> int:
        """The forget epoch the step's last row belongs to (from 0)."""
        return (step * self.size - 1) // len(self.forget.rows)

    def micro_batches(self, step: int) -> list[dict[str, Any]]:
        """The ``accum`` micro batches this worker trains on at ``step`` (from 1), host tensors."""
        start = (step - 1) * self.size
        parts = [self._parts(self.forget, start), self._parts(self.retain, start) if self.retain else None]
        out = []
        for a in range(self.accum):
            batch: dict[str, Any] = {"retain": None}
            for stream_parts in filter(None, parts):
                batch.update({key: chunks[a] for key, chunks in stream_parts.items()})
            out.append(batch)
        return out

    def _parts(self, stream: RowStream, start: int) -> dict[str, list[dict]]:
        rows = stream.indices(start, start + self.size)
        mine = rows[self.rank * self.micro * self.accum : (self.rank + 1) * self.micro * self.accum]
        out: dict[str, list[dict]] = {}
        for key in stream.rows[0]:
            # a global batch without targets sums to 0: any positive norm keeps its loss 0, not 0/0
            norm = torch.tensor(max(1, stream.tokens(key, rows)) / (self.accum * self.world), dtype=torch.float32)
            out[key] = []
            for a in range(self.accum):
                chunk = collate([stream.rows[i][key] for i in mine[a * self.micro : (a + 1) * self.micro]], self.pad)
                out[key].append({**chunk, "norm": norm})
        return out


def total_steps(spec: UnlearnSpec, n_forget: int, global_batch: int) -> int:
    """``max_steps``, else enough steps for ``epochs`` passes over the forget rows."""
    if spec.max_steps:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * n_forget / global_batch))
