"""Batched model scoring: answer NLLs (teacher forcing) and greedy answers.

Both use :mod:`jobs.data.format`'s encoding, the one the models were trained with. Examples are
sorted by length so that batches carry little padding; results come back in the input order.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from jobs.data.format import DEFAULT_TEMPLATE, collate, encode_qa, prompt_ids, sequence_nll


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices sorted by length (longest first) and cut into batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def qa_logits(model: Any, tokenizer: Any, questions: Sequence[str], answers: Sequence[str], batch_size: int,
              max_length: int, template: str) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """``encoded_logits`` over question/answer pairs (``encode_qa``)."""
    encoded = [encode_qa(tokenizer, q, a, max_length, template) for q, a in zip(questions, answers)]
    return encoded_logits(model, tokenizer, encoded, batch_size)


def encoded_logits(model: Any, tokenizer: Any, encoded: Sequence[dict], batch_size: int
                   ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Teacher-forced batches of encoded rows (``input_ids``/``labels`` lists; ``collate`` right-pads them),
    longest first: yields ``(indices, logits [B, T, V], labels [B, T])`` under ``inference_mode``, labels on
    the model's device."""
    pad, device = _pad_id(tokenizer), _device(model)
    model.eval()
    with torch.inference_mode():
        for idx in _batches([len(e["input_ids"]) for e in encoded], batch_size):
            batch = collate([encoded[i] for i in idx], pad)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            yield idx, logits, batch["labels"].to(device)


def score_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    template: str = DEFAULT_TEMPLATE,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) of each answer given its question, and its number of answer tokens.

    Each pair is encoded with ``encode_qa`` (answer + EOS, prompt masked, cut to ``max_length``),
    right-padded with ``collate`` and scored with ``sequence_nll``. Returns float64 ``nll_sum`` and
    int64 ``n_tokens``, both of shape ``[len(questions)]``, in the input order.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions for {len(answers)} answers")
    encoded = [encode_qa(tokenizer, q, a, max_length, template) for q, a in zip(questions, answers)]
    return encoded_nll(model, tokenizer, encoded, batch_size)


def encoded_nll(model: Any, tokenizer: Any, encoded: Sequence[dict], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) of each encoded row's target tokens and their count (float64, int64; input order)."""
    nll_sum = np.zeros(len(encoded), dtype=np.float64)
    n_tokens = np.zeros(len(encoded), dtype=np.int64)
    if len(encoded):
        for idx, logits, labels in encoded_logits(model, tokenizer, encoded, batch_size):
            nll, count = sequence_nll(logits, labels)
            nll_sum[idx] = nll.double().cpu().numpy()
            n_tokens[idx] = count.cpu().numpy()
    return nll_sum, n_tokens


def greedy_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    template: str = DEFAULT_TEMPLATE,
) -> list[str]:
    """Greedy (argmax) continuation of each question's prompt, decoded and stripped.

    Prompts are ``prompt_ids`` (BOS + template), left-padded into batches with an attention mask and
    passed to ``model.generate(do_sample=False)``. Only new tokens are decoded, cut at the first EOS.
    """
    if not questions:
        return []
    prompts = [prompt_ids(tokenizer, q, template) for q in questions]
    pad, eos, device = _pad_id(tokenizer), tokenizer.eos_token_id, _device(model)
    out: list[str] = [""] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for idx in _batches([len(p) for p in prompts], batch_size):
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                k = len(prompts[i])
                input_ids[row, width - k :] = torch.tensor(prompts[i], dtype=torch.long)
                mask[row, width - k :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row, i in enumerate(idx):
                new = generated[row, width:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return out
