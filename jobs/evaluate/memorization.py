"""Memorization (the ``memorization`` suite): exact memorization, extraction strength, verbatim ROUGE.

Over each forget-style split (``forget``, ``forget_<subset>``), keys ``{split}_exact_mem``,
``{split}_extraction_strength`` and ``{split}_verbatim_rouge`` (so ``forget_exact_mem`` ...):

- exact memorization (Tirumala et al. 2022; TOFU/open-unlearning ``exact_memorization``): with teacher
  forcing on the answer tokens (answer + EOS), the fraction of positions where the argmax prediction
  equals the target token.
- extraction strength (Carlini et al. 2021 style; open-unlearning ``extraction_strength``, Wang et al.
  2025): ``1 - m / n`` with ``m`` the smallest prefix length such that the teacher-forced argmax
  predictions of the suffix ``x_{m:}`` all equal it. ``m = n`` (ES 0) when not even the last token is
  predicted; open-unlearning's loop stops at ``m = n - 1`` there (ES ``1/n``), which we do not copy.
- verbatim memorization (MUSE VerbMem, Shi et al. 2024): the prompt plus the first ``n // 2`` answer
  tokens (no EOS) are given, the model greedily continues for ``n - n // 2`` tokens (at most
  ``max_new_tokens``), and the continuation is scored with ROUGE-L recall
  (:func:`jobs.evaluate.metrics.rouge_l_recall`) against the decoded second half.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jobs.data.format import DEFAULT_TEMPLATE, PromptLike
from jobs.evaluate import metrics as M
from jobs.evaluate.suites import NoOptions, SuiteContext, is_forget_split, register_suite

# ----------------------------------------------------------------------------------------- pure parts


def exact_memorization(pred_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """Fraction of positions where ``pred_ids[t] == label_ids[t]``; NaN for no tokens."""
    p, y = np.asarray(pred_ids), np.asarray(label_ids)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape} predictions for {y.shape} labels")
    return float((p == y).mean()) if y.size else float("nan")


def extraction_strength(pred_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """``1 - m / n``, ``m`` the smallest prefix length with ``pred_ids[m:] == label_ids[m:]``
    (``m = n``, the empty suffix, when the last token is wrong); NaN for no tokens."""
    p, y = np.asarray(pred_ids), np.asarray(label_ids)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape} predictions for {y.shape} labels")
    n = y.size
    if n == 0:
        return float("nan")
    wrong = np.flatnonzero(p != y)
    m = 0 if wrong.size == 0 else int(wrong[-1]) + 1  # the suffix after the last mismatch matches
    return 1.0 - m / n


def split_answer(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """First ``n // 2`` and remaining answer tokens (the VerbMem prefix and target)."""
    ids = list(ids)
    h = len(ids) // 2
    return ids[:h], ids[h:]


# ------------------------------------------------------------------------------------- model-facing


def greedy_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int] | int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy new token ids after each prompt (left-padded batches, cut at EOS and at its own budget)."""
    import torch

    from jobs.evaluate.placement import input_device
    from jobs.evaluate.scoring import left_pad, length_batches, pad_id

    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    pad, eos, device = pad_id(tokenizer), tokenizer.eos_token_id, input_device(model)
    out: list[list[int]] = [[] for _ in prompts]
    model.eval()
    with torch.inference_mode():
        for idx in length_batches([len(p) for p in prompts], batch_size):
            steps = max(budgets[i] for i in idx)
            if steps < 1:
                continue
            input_ids, mask = left_pad([prompts[i] for i in idx], pad)
            width = input_ids.shape[1]
            gen = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=steps,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row, i in enumerate(idx):
                new = gen[row, width:].tolist()[: budgets[i]]
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                out[i] = new
    return out


def verbatim_rouge(
    model: Any,
    tokenizer: Any,
    records: list[dict],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    max_length: int = 128,
    template: PromptLike = DEFAULT_TEMPLATE,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Per-record VerbMem ROUGE-L recall, with the generated and reference second halves."""
    from jobs.data.format import answer_ids, as_format, prompt_ids

    bare = as_format(template).model_copy(update={"answer_eos": False})  # the answer's text tokens only
    prompts, refs, budgets = [], [], []
    for r in records:
        p = prompt_ids(tokenizer, r["question"], bare)
        first, second = split_answer(answer_ids(tokenizer, r["answer"], bare)[: max(0, max_length - len(p))])
        prompts.append(p + first)
        refs.append(tokenizer.decode(second, skip_special_tokens=True).strip())
        budgets.append(min(len(second), max_new_tokens))
    gen = greedy_continuations(model, tokenizer, prompts, budgets, batch_size)
    preds = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]
    return M.rouge_l_recall(preds, refs), preds, refs


@register_suite(
    "memorization", needs=("forget",), groups=(("Memorization", r".*_(exact_mem|extraction_strength|verbatim_rouge)$"),)
)
def memorization_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: NoOptions) -> dict:
    """``{split}_exact_mem``, ``{split}_extraction_strength``, ``{split}_verbatim_rouge`` (means over
    records) for every forget-style split; ``raw`` holds the same keys per example."""
    from jobs.evaluate.mia import answer_token_stats

    out_m: dict[str, float] = {}
    raw: dict[str, list[float]] = {}
    splits = {s: r for s, r in data.items() if is_forget_split(s) and r}
    if not splits:
        raise ValueError(f"the 'memorization' suite needs a non-empty forget split; got {sorted(data)}")
    for split, records in splits.items():
        stats = answer_token_stats(
            ctx.model,
            ctx.tokenizer,
            [r["question"] for r in records],
            [r["answer"] for r in records],
            ctx.batch_size,
            ctx.max_length,
            ctx.template,
        )
        em = [exact_memorization(s["pred"], s["labels"]) for s in stats]
        es = [extraction_strength(s["pred"], s["labels"]) for s in stats]
        vr, _, _ = verbatim_rouge(
            ctx.model, ctx.tokenizer, records, ctx.max_new_tokens, ctx.batch_size, ctx.max_length, ctx.template
        )
        for name, vals in (("exact_mem", em), ("extraction_strength", es), ("verbatim_rouge", list(vr))):
            vals = [float(v) for v in vals]
            out_m[f"{split}_{name}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
            raw[f"{split}_{name}"] = vals
    return {"metrics": out_m, "raw": raw}
