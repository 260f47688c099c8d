"""Probes (the ``probes`` suite): the forget questions asked another way, scored as the ``qa`` suite scores them.

A model that only learned to refuse or to drift away from the plain question may still answer it when it is put
differently. RWKU (Jin et al. 2024, "RWKU: Benchmarking Real-World Knowledge Unlearning for Large Language
Models", NeurIPS 2024 Datasets and Benchmarks, arXiv:2406.10890) probes its forget targets with adversarial
rewordings (prefix injection, affirmative suffix, role play, reverse query, in-context learning, among others);
TOFU (Maini et al. 2024, arXiv:2401.06121) pairs its forget questions with paraphrased ones. Each probe kind here
turns every row of the probed split (``split``, default ``forget``) into one probe:

* ``direct``: the question as it is: the unattacked reference, equal to the ``qa`` suite's ``forget_prob`` (and
  ``forget_rouge`` under the same ``stop``);
* ``paraphrase``: the row's ``paraphrased_question`` (TOFU's paraphrased questions) in its place; rows without
  one are left out of the kind, which is skipped when no row has one;
* one kind per entry of the templates file (``templates``, default ``probe_templates.yaml`` beside this module:
  prefix_injection, affirmative_suffix, role_play and reverse_query, written after RWKU's attack types of those
  names): the entry's ``prompt`` with the row's ``{question}`` (and ``{answer}``) filled in takes the question's
  place; its ``answer_prefix`` starts the answer's turn (prompt context, never scored); its ``target`` is what is
  scored: the answer, or the question given the answer (a reverse query);
* ``in_context``: in-context re-teaching: ``in_context_k`` other rows of the split (a seeded draw, ``seed``;
  never the row itself) written before the question as answered examples; with a plain template each as the
  template filled in and its answer (``"Question: q\\nAnswer: a\\n\\n"`` with the default one), then the row's
  prompt; with a chat template as ``"Question: q\\nAnswer: a\\n\\n"`` blocks before the question in the user turn.

How a probe is scored: its text takes the question's place in the run's prompt format (``jobs.data.format``:
the plain template or the chat template's user turn, with the generation prompt); the answer prefix follows
(after one space with a plain template, after the template's own assistant lead with a chat one); the target
follows as an answer follows its prompt (after one space; with EOS or the end-of-turn when ``answer_eos``),
tokenized apart from the prompt, so its tokens are the ones the ``qa`` suite scores. Teacher forcing gives
``probe_{kind}_prob``, the mean over rows of ``exp(-mean target-token NLL)`` (TOFU's probability), and greedy
answers from the same prompts ``probe_{kind}_rouge``, the mean ROUGE-L recall against the target. A target keeps
the tokens the ``qa`` suite leaves the row's answer after the plain question (``max_length`` minus that prompt's
length): a longer probe prompt never cuts its target further. ``probe_worst_prob`` and ``probe_worst_rouge`` are
the largest of the attack kinds' (every kind that scores the answer: not ``direct``, nor a reverse query, whose
target, the question, the answer sentence in its prompt gives away to a model that forgot the answer);
``info["probe_worst_kind"]`` names the kind of the worst probability (``probe_worst_rouge_kind`` that of the
worst ROUGE). A kind's numbers are on its own
scale even for a model that forgot nothing (an answer prefix or examples make the answer likelier; a reverse
query scores a question, not an answer): compare a kind across models, not kinds with each other.
``probes_recovery`` (on the driver, ``jobs.evaluate.suites.Recovery``) does that: each attack kind's
probability is taken relative to the base model's under the same kind, the direct question's relative to the
base's direct one, and the recovery is the largest over the kinds.

Where spunge differs from RWKU: RWKU writes its probes per target person (fill-in-the-blank, question answering
and adversarial types), asks them of the model and judges the generated answers by ROUGE against the expected
answer; here the probes are templates applied to the run's own forget QA rows, and each is judged by both
the target's length-normalised probability under teacher forcing (as TOFU's forget probability) and the ROUGE-L
recall of greedy answers, so the attacked numbers compare with ``forget_prob`` and ``forget_rouge`` of the same
model.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jobs.data.format import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    PromptFormat,
    PromptLike,
    answer_ids,
    as_format,
    chat_turn,
    prompt_ids,
    prompt_text,
    special_ids,
)
from jobs.data.sources import SOURCES
from jobs.evaluate.suites import Recovery, SuiteContext, is_qa_split, register_suite

TEMPLATES = Path(__file__).with_name("probe_templates.yaml")
DIRECT, PARAPHRASE, IN_CONTEXT = "direct", "paraphrase", "in_context"
RESERVED = (DIRECT, PARAPHRASE, IN_CONTEXT, "worst")  # built-in kinds, and the worst-case metrics' name
SHOT = "Question: {question}\nAnswer: {answer}\n\n"  # an in-context example inside a chat user turn
ENTRY_KEYS = ("prompt", "target", "answer_prefix", "source")
TARGETS = {"answer": "question", "question": "answer"}  # what is scored -> the field the prompt must hold


class ProbesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    templates: Optional[str] = Field(
        None, description="YAML/JSON file of probe templates (default: the shipped probe_templates.yaml)"
    )
    kinds: Optional[list[str]] = Field(
        None,
        min_length=1,
        description="probe kinds to run: direct, paraphrase, in_context and the templates' names "
        "(default: every kind the templates and the data allow)",
    )
    in_context_k: int = Field(3, ge=1, description="in_context: answered rows written before the question")
    seed: int = Field(0, description="in_context: seed of the draw of each row's examples")
    stop: list[str] = Field(
        default_factory=list,
        description="strings that end a greedy answer (EOS and a chat end-of-turn always do), e.g. ['\\n']",
    )
    split: str = Field("forget", description="the question/answer split probed (forget, or another QA split)")


@dataclass(frozen=True)
class ProbeTemplate:
    """One entry of the templates file (see ``probe_templates.yaml``)."""

    name: str
    prompt: str
    target: str = "answer"
    answer_prefix: str = ""
    source: str = ""

    def text(self, row: dict) -> str:
        """The probe for one row: the prompt with its question and answer filled in."""
        return self.prompt.format(question=row["question"], answer=row["answer"])

    def reference(self, row: dict) -> str:
        return row[self.target]


def load_templates(path: Optional[str] = None) -> dict[str, ProbeTemplate]:
    """The probe templates of ``path`` (default: the shipped file), by name in the file's order; a
    ``ValueError`` of one line naming the file (and the entry) for a file that is missing, not a mapping or
    holds a bad entry."""
    import yaml

    file = Path(path) if path else TEMPLATES
    if not file.is_file():
        raise ValueError(f"templates: no such file {file}")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{file}: not valid YAML/JSON ({getattr(e, 'problem', None) or e}{where})") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{file}: expected a YAML/JSON mapping of probe templates (name: {{prompt, target, answer_prefix, "
            f"source}}), got {type(raw).__name__}"
        )
    return {str(name): _template(file, name, entry) for name, entry in raw.items()}


def _template(file: Path, name: Any, entry: Any) -> ProbeTemplate:
    def bad(problem: str) -> ValueError:
        return ValueError(f"{file}: entry {name!r}: {problem}")

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise bad("a name is letters, digits and _ (it names metrics probe_<name>_prob)")
    if name in RESERVED:
        raise bad(f"the name is taken (reserved: {', '.join(RESERVED)})")
    if not isinstance(entry, dict):
        raise bad(f"expected a mapping with {', '.join(ENTRY_KEYS)}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise bad(f"unknown key(s) {unknown}; known: {', '.join(ENTRY_KEYS)}")
    for key in ENTRY_KEYS:
        if key in entry and not isinstance(entry[key], str):
            raise bad(f"{key} must be a string, got {type(entry[key]).__name__}")
    if "prompt" not in entry:
        raise bad("no prompt")
    target = entry.get("target", "answer")
    if target not in TARGETS:
        raise bad(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(entry["prompt"]) if f is not None}
    except ValueError as e:
        raise bad(f"prompt is not a format string ({e}; write a literal brace as {{{{ or }}}})") from None
    other = sorted(fields - {"question", "answer"})
    if other:
        raise bad(f"prompt has unknown field(s) {['{' + f + '}' for f in other]}; known: {{question}}, {{answer}}")
    if TARGETS[target] not in fields:
        raise bad(f"prompt has no {{{TARGETS[target]}}} (target: {target} scores the {target} given it)")
    if target in fields:
        raise bad(f"prompt holds {{{target}}}, the target it scores (target: {target})")
    return ProbeTemplate(name, entry["prompt"], target, entry.get("answer_prefix", ""), entry.get("source", ""))


def known_kinds(templates: dict[str, ProbeTemplate]) -> list[str]:
    """Every kind a templates file makes available, in the order they are run."""
    return [DIRECT, PARAPHRASE, *templates, IN_CONTEXT]


def select_kinds(kinds: Optional[Sequence[str]], templates: dict[str, ProbeTemplate]) -> list[str]:
    """The kinds asked for (all by default), in their run order; ``ValueError`` naming the known ones for an
    unknown kind."""
    known = known_kinds(templates)
    unknown = [k for k in kinds or () if k not in known]
    if unknown:
        raise ValueError(f"kinds: unknown probe kind(s) {unknown}; known: {', '.join(known)}")
    return [k for k in known if kinds is None or k in kinds]


def check_options(opts: ProbesOptions) -> list[str]:
    """What the config can check before any task runs: the templates file and the kinds."""
    try:
        select_kinds(opts.kinds, load_templates(opts.templates))
    except ValueError as e:
        return [str(e)]
    return []


def in_context_shots(n: int, k: int, seed: int = 0) -> list[list[int]]:
    """For each of ``n`` rows, the indices of ``min(k, n - 1)`` other rows drawn without replacement (one seeded
    ``numpy.random.default_rng(seed)`` stream over the rows in order): its in-context examples."""
    rng, k = np.random.default_rng(seed), min(k, n - 1)
    # a draw among the n - 1 others, shifted past the row itself, so that it is never its own example
    return [[int(j) + (j >= i) for j in rng.choice(n - 1, size=k, replace=False)] for i in range(n)]


def in_context_parts(rows: Sequence[dict], row: dict, fmt: PromptFormat) -> tuple[str, str]:
    """``(before, text)`` of an in-context probe: what goes before the whole prompt and what takes the question's
    place. A plain template's examples are the template filled in and answered, before the row's prompt (the
    answer after one space, as answers follow their prompts); a chat template's are ``SHOT`` blocks before the
    question in the user turn (before the rendered chat they would precede its special tokens)."""
    if fmt.chat:
        shots = "".join(SHOT.format(question=r["question"], answer=r["answer"].strip()) for r in rows)
        return "", shots + row["question"]
    shots = "".join(f"{fmt.template.format(question=r['question'])} {r['answer'].strip()}\n\n" for r in rows)
    return shots, row["question"]


def probe_ids(
    tokenizer: Any,
    text: str,
    target: str,
    template: PromptLike = DEFAULT_TEMPLATE,
    answer_prefix: str = "",
    before: str = "",
) -> tuple[list[int], list[int]]:
    """``(prompt ids, target ids)`` of one probe: ``text`` in the question's place of the format's prompt (after
    ``before``), then ``answer_prefix`` on the answer's side; the target as an answer follows its prompt. Without a
    prefix or ``before`` these are ``encode_qa``'s prompt and answer ids of ``(text, target)``."""
    fmt = as_format(template)
    prompt = before + prompt_text(tokenizer, text, fmt)
    prefix = answer_prefix.strip()
    if not prefix:
        target_ids = answer_ids(tokenizer, target, fmt)
    elif fmt.chat:
        lead, end = chat_turn(tokenizer, fmt)
        prompt += lead + prefix
        target_ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        if fmt.answer_eos and end:
            target_ids = target_ids + tokenizer(end, add_special_tokens=False)["input_ids"]
    else:
        prompt += " " + prefix
        target_ids = answer_ids(tokenizer, target, fmt)  # " " + target (+ EOS): it follows the prefix as a prompt
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if fmt.chat else special_ids(tokenizer, prompt)
    return ids, target_ids


@dataclass(frozen=True)
class Probe:
    kind: str
    row: int  # index in the probed split
    prompt: list[int]
    target: list[int]
    reference: str  # the target's text, for ROUGE
    room: int  # target tokens scored: what qa leaves the row's answer after the plain question

    def encoded(self) -> dict[str, list[int]]:
        """``input_ids`` / ``labels`` of the teacher-forced pass (a probe with no room is one unscored token)."""
        if self.room <= 0:
            return {"input_ids": self.prompt[:1], "labels": [IGNORE_INDEX]}
        target = self.target[: self.room]
        return {"input_ids": self.prompt + target, "labels": [IGNORE_INDEX] * len(self.prompt) + target}


def build_probes(
    tokenizer: Any,
    rows: Sequence[dict],
    kinds: Sequence[str],
    templates: dict[str, ProbeTemplate],
    template: PromptLike = DEFAULT_TEMPLATE,
    max_length: int = 128,
    in_context_k: int = 3,
    seed: int = 0,
) -> list[Probe]:
    """Every kind's probes over ``rows`` (kinds the data cannot serve give none: ``paraphrase`` without a
    ``paraphrased_question``, ``in_context`` with fewer than two rows)."""
    fmt = as_format(template)
    rooms = [max(0, max_length - len(prompt_ids(tokenizer, r["question"], fmt))) for r in rows]
    probes = []

    def add(kind: str, i: int, text: str, target: str, prefix: str = "", before: str = "") -> None:
        p, t = probe_ids(tokenizer, text, target, fmt, prefix, before)
        probes.append(Probe(kind, i, p, t, target, rooms[i]))

    for kind in kinds:
        if kind == DIRECT:
            for i, r in enumerate(rows):
                add(kind, i, r["question"], r["answer"])
        elif kind == PARAPHRASE:
            for i, r in enumerate(rows):
                if isinstance(r.get("paraphrased_question"), str) and r["paraphrased_question"].strip():
                    add(kind, i, r["paraphrased_question"], r["answer"])
        elif kind == IN_CONTEXT:
            if len(rows) >= 2:
                for i, shots in enumerate(in_context_shots(len(rows), in_context_k, seed)):
                    before, text = in_context_parts([rows[j] for j in shots], rows[i], fmt)
                    add(kind, i, text, rows[i]["answer"], before=before)
        else:
            tpl = templates[kind]
            for i, r in enumerate(rows):
                add(kind, i, tpl.text(r), tpl.reference(r), tpl.answer_prefix)
    return probes


def _mean(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _worst(metrics: dict[str, float], kinds: Sequence[str], what: str) -> Optional[tuple[str, float]]:
    """The kind of ``kinds`` with the largest finite ``probe_{kind}_{what}``, and that value."""
    found = [(k, metrics[f"probe_{k}_{what}"]) for k in kinds if f"probe_{k}_{what}" in metrics]
    found = [(k, v) for k, v in found if np.isfinite(v)]
    return max(found, key=lambda kv: kv[1]) if found else None


@register_suite(
    "probes",
    needs=lambda o: (o.split,) if o.split in SOURCES else (f"eval_sets.{o.split}",),
    options=ProbesOptions,
    path_options=("templates",),
    groups=(("Probes", r"^probe_"),),
    check=check_options,
    # each attack kind against its own value on the base model (a prefix that makes any answer likelier is not
    # recovery); the kinds are the result's parts["probes_recovery"]: those that score the answer
    recoveries=(
        Recovery(
            "probes_recovery", attacked=r"probe_(?!direct_prob$|worst_prob$).+_prob", unlearned="probe_direct_prob"
        ),
    ),
)
def probes_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: ProbesOptions) -> dict:
    """The probes of the split ``opts.split`` (see the module doc).

    Metrics per kind run: ``probe_{kind}_prob`` (mean over its rows of exp(-mean target-token NLL)) and
    ``probe_{kind}_rouge`` (mean ROUGE-L recall of greedy answers against the target); over the attack kinds
    that score the answer (all but ``direct`` and the reverse queries): ``probe_worst_prob`` and
    ``probe_worst_rouge``, their largest. ``info``: ``probe_worst_kind`` (the kind of ``probe_worst_prob``),
    ``probe_worst_rouge_kind``, and ``probes_skipped`` naming kinds the split cannot serve. ``parts``:
    ``probes_recovery``, the attack kinds' metrics its recovery takes the largest of. ``raw``: per row of the
    split, ``probe_{kind}_prob`` (NaN where a row has no probe of the kind: no paraphrased question).
    """
    from jobs.evaluate import metrics as M
    from jobs.evaluate.scoring import encoded_nll, generate_answers

    templates = load_templates(opts.templates)
    kinds = select_kinds(opts.kinds, templates)
    rows = data.get(opts.split) or []
    if not rows or not is_qa_split(rows):
        raise ValueError(
            f"the 'probes' suite needs a non-empty question/answer split {opts.split!r} (string question and "
            f"answer in every row); got {sorted(data)}"
        )
    probes = build_probes(
        ctx.tokenizer, rows, kinds, templates, ctx.template, ctx.max_length, opts.in_context_k, opts.seed
    )
    for kind in kinds:
        if opts.kinds and kind in opts.kinds and not any(p.kind == kind for p in probes):
            print(f"probes: kind {kind!r} skipped: the split {opts.split!r} cannot serve it", flush=True)
    nll, n = encoded_nll(ctx.model, ctx.tokenizer, [p.encoded() for p in probes], ctx.batch_size)
    probs = M.answer_prob(nll, n)
    gen, _ = generate_answers(
        ctx.model,
        ctx.tokenizer,
        [p.prompt for p in probes],
        ctx.max_new_tokens,
        ctx.batch_size,
        ctx.template,
        opts.stop,
    )
    rouge = M.rouge_l_recall(gen, [p.reference for p in probes])
    metrics: dict[str, float] = {}
    raw: dict[str, list[float]] = {}
    run = [k for k in kinds if any(p.kind == k for p in probes)]
    for kind in run:
        idx = [j for j, p in enumerate(probes) if p.kind == kind]
        per_row = np.full(len(rows), np.nan)
        per_row[[probes[j].row for j in idx]] = probs[idx]
        metrics[f"probe_{kind}_prob"] = _mean(probs[idx])
        metrics[f"probe_{kind}_rouge"] = float(np.mean(rouge[idx]))
        raw[f"probe_{kind}_prob"] = per_row.tolist()
    # a kind that scores the question (a reverse query) reads the answer sentence, which gives the question away:
    # a model that forgot the answer scores it as the base does, so it is reported but is no attack on the answer
    attacks = [k for k in run if k != DIRECT and (k not in templates or templates[k].target == "answer")]
    info: dict[str, str] = {}
    for what, key in (("prob", "probe_worst_kind"), ("rouge", "probe_worst_rouge_kind")):
        worst = _worst(metrics, attacks, what)
        if worst is not None:
            info[key], metrics[f"probe_worst_{what}"] = worst
    if skipped := [k for k in kinds if k not in run]:
        info["probes_skipped"] = f"{', '.join(skipped)}: the split {opts.split!r} cannot serve it"
    return {
        "metrics": metrics,
        "raw": raw,
        "info": info,
        "parts": {"probes_recovery": [f"probe_{k}_prob" for k in attacks]},
    }
