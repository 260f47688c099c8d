"""MUSE's verbatim memorization (the ``verbmem`` suite; Shi et al. 2024, "MUSE: Machine Unlearning Six-Way
Evaluation for Language Models").

Each row of the eval set (hub ``muse-bench/MUSE-News``, config ``verbmem``, split ``forget``: columns
``prompt``, the opening of a forget document, and ``gt``, its true continuation) is given to the model as
raw text (the tokenizer's own BOS, no template); the model continues it greedily for ``max_new_tokens``
tokens (MUSE: 128) and the continuation is scored with ROUGE-L F1 against ``gt``
(:func:`jobs.evaluate.metrics.rouge_l_f1`). ``forget_verbmem_rouge`` is the mean; lower after unlearning
means less of the text is reproduced (MUSE's "no verbatim memorization", open-unlearning's
``forget_verbmem_ROUGE``).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jobs.data.format import PromptFormat
from jobs.evaluate import metrics as M
from jobs.evaluate.suites import SuiteContext, register_suite

RAW = PromptFormat(template="{question}", answer_eos=False)  # the text as it is, after the tokenizer's BOS


class VerbmemOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: str = Field("verbmem", description="the data.eval_sets entry with prompt and gt columns")
    max_new_tokens: int = Field(128, gt=0, description="greedy continuation length (MUSE: 128)")


def prompts_and_truths(rows: list[dict], split: str) -> tuple[list[str], list[str]]:
    """``(prompts, gts)`` of the rows; ValueError naming the first row without string ``prompt`` and ``gt``."""
    for i, r in enumerate(rows, 1):
        for col in ("prompt", "gt"):
            if not isinstance(r.get(col), str) or not r[col].strip():
                raise ValueError(
                    f"eval set {split!r} row {i}: column {col!r}: expected a non-empty string, got "
                    f"{r.get(col)!r} (MUSE's verbmem rows: prompt, gt)"
                )
    return [r["prompt"] for r in rows], [r["gt"] for r in rows]


@register_suite(
    "verbmem",
    needs=lambda o: (f"eval_sets.{o.split}",),
    options=VerbmemOptions,
    groups=(("Memorization", r"^forget_verbmem_rouge$"),),
)
def verbmem_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: VerbmemOptions) -> dict:
    """``forget_verbmem_rouge``: mean ROUGE-L F1 of greedy continuations of the forget prefixes; ``raw``
    holds the per-prefix values."""
    from jobs.evaluate.scoring import generate_answers

    if not data.get(opts.split):
        raise ValueError(f"the 'verbmem' suite needs the eval set {opts.split!r} (data.eval_sets.{opts.split})")
    prompts, gts = prompts_and_truths(data[opts.split], opts.split)
    gen, _ = generate_answers(ctx.model, ctx.tokenizer, prompts, opts.max_new_tokens, ctx.batch_size, RAW)
    f1 = M.rouge_l_f1(gen, gts)
    return {"metrics": {"forget_verbmem_rouge": float(np.mean(f1))}, "raw": {"forget_verbmem_rouge": f1.tolist()}}
