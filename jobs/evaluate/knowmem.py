"""MUSE's knowledge memorization (the ``knowmem`` suite; Shi et al. 2024): question answering about the forget
corpus (forget: lower is better) and about the retain corpus (utility: should stay).

Hub ``muse-bench/MUSE-News`` config ``knowmem``: splits ``forget_qa`` and ``retain_qa`` (question, answer), and
``forget_qa_icl`` / ``retain_qa_icl``, the few-shot examples put before each question. spunge reads them as
eval sets ``knowmem_forget``, ``knowmem_retain`` and ``<split>_icl``. The prompt is raw text (the tokenizer's
own BOS, no template)::

    Question: {icl question 1}\\nAnswer: {icl answer 1}\\n\\n ... Question: {question}\\nAnswer:

the model answers greedily (at most ``max_new_tokens``, MUSE: 32; the answer ends at the first newline) and the
answer is scored with ROUGE-L F1 against ``answer`` (:func:`jobs.evaluate.metrics.rouge_l_f1`):
``knowmem_forget_rouge`` and ``knowmem_retain_rouge`` (open-unlearning's ``forget_knowmem_ROUGE`` and
``retain_knowmem_ROUGE``).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jobs.evaluate import metrics as M
from jobs.evaluate.suites import SuiteContext, register_suite
from jobs.evaluate.verbmem import RAW


class KnowmemOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    splits: list[str] = Field(
        default_factory=lambda: ["knowmem_forget", "knowmem_retain"],
        description="eval sets of questions; each one's few-shot examples: <split>_icl if set",
    )
    max_new_tokens: int = Field(32, gt=0, description="answer length (MUSE: 32)")


def few_shot_prompt(icl: list[dict], question: str) -> str:
    """The few-shot examples, then the question (see the module doc)."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    return f"{shots}Question: {question}\nAnswer:"


@register_suite(
    "knowmem",
    needs=lambda o: tuple(f"eval_sets.{s}" for s in o.splits),
    options=KnowmemOptions,
    groups=(("Forget", r"^knowmem_forget"), ("Utility", r"^knowmem_retain")),
)
def knowmem_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: KnowmemOptions) -> dict:
    """``<split>_rouge`` per eval set (mean ROUGE-L F1 of the few-shot answers); ``raw`` per question."""
    from jobs.evaluate.scoring import generate_answers

    metrics, raw = {}, {}
    for split in opts.splits:
        rows = data.get(split)
        if not rows:
            raise ValueError(f"the 'knowmem' suite needs the eval set {split!r} (data.eval_sets.{split})")
        icl = data.get(f"{split}_icl", [])
        prompts = [few_shot_prompt(icl, r["question"]) for r in rows]
        gen, _ = generate_answers(
            ctx.model, ctx.tokenizer, prompts, opts.max_new_tokens, ctx.batch_size, RAW, stop=["\n"]
        )
        f1 = M.rouge_l_f1(gen, [r["answer"] for r in rows])
        metrics[f"{split}_rouge"], raw[f"{split}_rouge"] = float(np.mean(f1)), f1.tolist()
    return {"metrics": metrics, "raw": raw}
