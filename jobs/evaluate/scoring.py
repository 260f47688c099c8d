"""Batched model scoring: answer NLLs (teacher forcing) and greedy answers.

Both use :mod:`jobs.data.format`'s encoding, the one the models were trained with. Examples are
sorted by length so that batches carry little padding; results come back in the input order.
Teacher forcing projects only the positions that predict a target token onto the vocabulary
(``logits_to_keep``) and log-softmaxes only those; generation is ``model.generate`` with its KV cache,
a batch ending as soon as all its rows have stopped.
"""

from __future__ import annotations

import functools
import inspect
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from jobs.data.format import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    PromptLike,
    collate,
    encode_qa,
    prompt_ids,
    stop_token_ids,
)
from jobs.evaluate.placement import input_device, spans_devices

# where the batch loops report (what, rows done, rows of the pass): set by ``reporting`` around a suite
_PROGRESS: ContextVar[Optional[Callable[[str, int, int], None]]] = ContextVar("scoring_progress", default=None)


@contextmanager
def reporting(progress: Optional[Callable[[str, int, int], None]]) -> Iterator[None]:
    """Inside, every scoring pass calls ``progress(what, rows done, rows of the pass)`` after each batch
    ("scored": teacher forcing, "generated": greedy answers)."""
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def reported_batches(batches: list[np.ndarray], what: str) -> Iterator[np.ndarray]:
    """The batches, each reported once its caller has taken the next (or ended)."""
    progress, total, done = _PROGRESS.get(), sum(len(b) for b in batches), 0
    for idx in batches:
        yield idx
        done += len(idx)
        if progress is not None:
            progress(what, done, total)


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices sorted by length (longest first) and cut into batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def qa_logits(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int,
    max_length: int,
    template: PromptLike,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``encoded_logits`` over question/answer pairs (``encode_qa``)."""
    encoded = [encode_qa(tokenizer, q, a, max_length, template) for q, a in zip(questions, answers)]
    return encoded_logits(model, tokenizer, encoded, batch_size)


def encoded_logits(
    model: Any, tokenizer: Any, encoded: Sequence[dict], batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Teacher-forced batches of encoded rows (``input_ids``/``labels`` lists; ``collate`` right-pads them),
    longest first, under ``inference_mode``. Yields ``(indices, logits [N, V], targets [N], rows [N])``:
    the logits only at the N positions of the batch whose next token is a target (row by row, left to
    right), those target ids, and each position's row in the batch (``indices[rows]``: its row in
    ``encoded``); all on the model's device. Only those positions go through the LM head
    (:func:`target_logits`): scoring an answer costs the forward pass of its tokens, not a vocabulary-wide
    projection of the whole prompt."""
    with torch.inference_mode():
        for idx, batch, keep, targets, rows in target_batches(model, tokenizer, encoded, batch_size):
            yield idx, target_logits(model, batch["input_ids"], batch["attention_mask"], keep), targets, rows


def target_batches(
    model: Any, tokenizer: Any, encoded: Sequence[dict], batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches ``encoded_logits`` scores, before the model sees them (the model put in eval mode): ``(indices,
    batch, keep, targets [N], rows [N])``, the collated batch and ``keep`` (the positions whose next token is a
    target, ``[B, T]``) on the model's input device, each reported as scored once the caller takes the next. The
    caller runs the model, under ``torch.inference_mode``."""
    pad, device = pad_id(tokenizer), input_device(model)
    model.eval()
    for idx in reported_batches(length_batches([len(e["input_ids"]) for e in encoded], batch_size), "scored"):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
        labels = batch["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        yield idx, batch, keep, labels[:, 1:][keep[:, :-1]], keep.nonzero()[:, 0]


def target_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Logits [N, V] of the positions where ``keep`` [B, T] is True (row-major), from one forward pass.

    Models whose forward slices with transformers' ``slice_logits_to_keep`` take ``keep`` as their
    ``logits_to_keep`` mask and project only those hidden states; any other model computes every
    position's logits and the kept ones are selected (the same values, up to float rounding); so does a model
    dispatched over several GPUs, whose final hidden states are not on the device the mask is moved to (the
    vocabulary projection is a small part of such a model's forward pass)."""
    if keeps_masked_logits(type(model)) and not spans_devices(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[keep]


@functools.cache
def keeps_masked_logits(cls: type) -> bool:
    """Whether ``cls.forward`` takes ``logits_to_keep`` and its module slices with transformers'
    ``slice_logits_to_keep`` (which accepts a boolean [B, T] mask; older or remote code may not)."""
    module = sys.modules.get(cls.__module__)
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params and getattr(module, "slice_logits_to_keep", None) is not None


def score_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    template: PromptLike = DEFAULT_TEMPLATE,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) of each answer given its question, and its number of answer tokens.

    Each pair is encoded with ``encode_qa`` (answer + EOS, prompt masked, cut to ``max_length``),
    right-padded with ``collate`` and scored as ``sequence_nll`` does, over the answer positions only
    (:func:`encoded_nll`). Returns float64 ``nll_sum`` and int64 ``n_tokens``, both of shape
    ``[len(questions)]``, in the input order.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions for {len(answers)} answers")
    encoded = [encode_qa(tokenizer, q, a, max_length, template) for q, a in zip(questions, answers)]
    return encoded_nll(model, tokenizer, encoded, batch_size)


def encoded_nll(model: Any, tokenizer: Any, encoded: Sequence[dict], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) of each encoded row's target tokens and their count (float64, int64; input order).

    ``sequence_nll``'s numbers (log-softmax in float32 of the logits that predict a target, minus the
    target's log-prob) from the target positions' logits only (:func:`encoded_logits`); each row's sum is
    taken in float64."""
    nll_sum = np.zeros(len(encoded), dtype=np.float64)
    n_tokens = np.zeros(len(encoded), dtype=np.int64)
    if len(encoded):
        for idx, logits, targets, rows in encoded_logits(model, tokenizer, encoded, batch_size):
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll = torch.zeros(len(idx), dtype=torch.float64, device=logp.device).index_add_(0, rows, -logp.double())
            nll_sum[idx] = nll.cpu().numpy()
            n_tokens[idx] = torch.bincount(rows, minlength=len(idx)).cpu().numpy()
    return nll_sum, n_tokens


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Union[str, Sequence[int]]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    template: PromptLike = DEFAULT_TEMPLATE,
    stop: Sequence[str] = (),
) -> tuple[list[str], list[int]]:
    """Greedy (argmax) continuation of each question's prompt, decoded and stripped, and the number of
    tokens generated for it.

    Prompts are ``prompt_ids`` (the format's prompt; a question given as a list of token ids is the prompt
    as is), left-padded into batches with an attention mask and passed to ``model.generate(do_sample=False)``.
    Generation stops at EOS, at a chat format's end-of-turn token and at any of the ``stop`` strings (e.g.
    ``"\n"``); a batch ends when all its rows have stopped. The answer is cut before the first stop token or
    stop string; its length counts the tokens up to and including the one that stopped it.
    """
    if not questions:
        return [], []
    prompts = [prompt_ids(tokenizer, q, template) if isinstance(q, str) else list(q) for q in questions]
    stops = stop_token_ids(tokenizer, template)
    pad, device = pad_id(tokenizer), input_device(model)
    texts: list[str] = [""] * len(prompts)
    lengths: list[int] = [0] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for idx in reported_batches(length_batches([len(p) for p in prompts], batch_size), "generated"):
            input_ids, mask = left_pad([prompts[i] for i in idx], pad)
            width = input_ids.shape[1]
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=stops or None,
                pad_token_id=pad,
                stopping_criteria=[StopStrings(tokenizer, stop, width)] if stop else None,
            )
            for row, i in enumerate(idx):
                texts[i], lengths[i] = cut_answer(tokenizer, generated[row, width:].tolist(), stops, stop, pad)
    return texts, lengths


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded into ``input_ids`` and ``attention_mask`` [B, longest]: generation continues
    every row from the same last column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return input_ids, mask


class StopStrings:
    """A ``generate`` stopping criterion: a row is done once its decoded new tokens hold a stop string.
    (transformers' own ``stop_strings`` precomputes tables over the whole vocabulary on every call, which
    costs more than the generation of a short answer on a 49k vocabulary.)"""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop, self.width = tokenizer, [s for s in stop if s], prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def cut_answer(
    tokenizer: Any, new: list[int], stop_ids: Sequence[int], stop: Sequence[str], pad: int
) -> tuple[str, int]:
    """One generated row as (answer text, tokens generated). The answer ends before the first stop token
    (its length counts that token) or before the first stop string (its length counts the tokens up to the
    one that completed it); a row that stopped early is padded after that."""
    end = next((j for j, t in enumerate(new) if t in stop_ids), None)
    if end is not None:
        new, n = new[:end], end + 1
    else:
        while new and new[-1] == pad:
            new = new[:-1]
        n = len(new)
    text = tokenizer.decode(new, skip_special_tokens=True)
    stop = [s for s in stop if s and s in text]
    if stop:
        n = next(
            k
            for k in range(1, len(new) + 1)
            if any(s in tokenizer.decode(new[:k], skip_special_tokens=True) for s in stop)
        )
        text = text[: min(text.find(s) for s in stop)]
    return text.strip(), n
