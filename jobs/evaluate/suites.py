"""Evaluation suites: what a suite declares, the registry, and ``evaluate_model`` (what an eval task runs).

A suite is one file in ``jobs/evaluate/`` holding a function decorated with ``register_suite``::

    class Options(BaseModel):               # its options: the config section eval.<name>
        k: float = 0.4

    @register_suite("mia", needs=("forget", "holdout"), options=Options,
                    groups=(("Privacy", r"^(mia_.*|privleak)$"),),
                    references=(Reference("privleak", privleak_vs_oracle),))
    def mia_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: Options) -> dict:
        return {"metrics": {...}, "raw": {...}}

The declaration is all the driver reads: the config's ``eval.<name>`` section is ``options`` (validated on
the driver and again here), ``needs`` names the data sources a config must set for it, ``groups`` puts its
metrics into the report's groups, and ``references`` are metrics computed against the retain-only oracle
once every model is scored (``add_reference_metrics``). The suite function gets one ``SuiteContext`` (the
loaded model, its tokenizer, the prompt format and the limits), every split's records, and its options.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict

from jobs.data.format import DEFAULT_TEMPLATE, PromptLike
from jobs.data.sources import SOURCES
from jobs.registry import Registry

ROBUSTNESS = "Robustness"  # the report group of the attacks' metrics and their recoveries


def is_eval_set(source: str) -> bool:
    """``eval_sets.<name>``: a set of ``data.eval_sets`` a suite needs (MUSE's verbmem, knowmem_forget, ...)."""
    return source.startswith("eval_sets.") and len(source) > len("eval_sets.")


def describe_source(source: str) -> str:
    return SOURCES.get(source) or f"the eval set {source.split('.', 1)[1]!r} (data.{source})"


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class SuiteContext:
    """What every suite is given besides the data: the model and tokenizer, the prompt format and limits."""

    model: Any
    tokenizer: Any
    template: PromptLike = DEFAULT_TEMPLATE
    batch_size: int = 32
    max_new_tokens: int = 32  # greedy generation
    max_length: int = 128  # tokens of prompt + answer (longer ones are cut)


@dataclass(frozen=True)
class Reference:
    """A metric of every model relative to the retain-only oracle: ``compute(result, oracle_result)`` from
    two models' suite results (``{"metrics", "raw"}``), or None when either lacks what it needs."""

    metric: str
    compute: Callable[[dict, dict], Optional[float]]


@dataclass(frozen=True)
class Recovery:
    """How much of what unlearning removed an attack brings back, on one forget metric (higher = more known),
    each value taken relative to the base model's under the same condition:

        recovery = (a / A - u / U) / (1 - u / U), clipped to [0, 1]

    ``a`` and ``u``: the model's value with and without the attack; ``A`` and ``U``: the base model's. Where the
    attack leaves the base as it was (``A == U``) this is ``(a - u) / (U - u)``, the share of the forgotten
    answer probability the attack gives back; the ratio to ``A`` keeps an attack that raises every model's
    score (a prompt prefix that makes answers likelier, a layer that reads a little better) from counting as
    recovery. 0: the attack brings nothing back; 1: under it the model knows the forget set as well as the base
    does. None where a value is missing, or the model forgot nothing by that metric (``u >= U``).

    ``attacked`` is a metric name or a regular expression over metric names (several attacks of one suite, such
    as the probe kinds): the largest recovery among the matching metrics that both models have; a model's result
    may name those metrics itself in ``parts[metric]`` (the probe kinds that attack the answer)."""

    metric: str
    attacked: str
    unlearned: str

    def compute(self, result: dict, base: dict) -> Optional[float]:
        m, b = result.get("metrics", {}), base.get("metrics", {})
        u, base_u = m.get(self.unlearned), b.get(self.unlearned)
        names = result.get("parts", {}).get(self.metric) or [k for k in m if re.fullmatch(self.attacked, k)]
        found = [recovery(m[k], u, b[k], base_u) for k in names if k in m and k in b]
        return max((v for v in found if v is not None), default=None)


def recovery(attacked: Any, unlearned: Any, base_attacked: Any, base: Any) -> Optional[float]:
    """``(a / A - u / U) / (1 - u / U)`` clipped to [0, 1] for ``a, u, A, U = attacked, unlearned, base_attacked,
    base`` (``Recovery``); None when a value is missing or not finite, ``A`` or ``U`` is not positive, or
    ``u >= U`` (nothing was forgotten, so nothing can be recovered)."""
    values = (attacked, unlearned, base_attacked, base)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    if base_attacked <= 0 or base <= 0 or unlearned >= base:
        return None
    kept = unlearned / base
    return min(1.0, max(0.0, (attacked / base_attacked - kept) / (1 - kept)))


WORST_RECOVERY = "worst_recovery"  # per model, the largest recovery over the attacks evaluated


SuiteFn = Callable[[SuiteContext, dict, Any], dict]


@dataclass(frozen=True)
class Suite:
    name: str
    fn: SuiteFn
    needs: Union[
        tuple[str, ...], Callable[[Any], tuple[str, ...]]
    ] = ()  # SOURCES or eval_sets.<name>; or of the options
    options: type[BaseModel] = NoOptions
    path_options: tuple[str, ...] = ()  # options naming local files or folders (resolved against the config)
    groups: tuple[tuple[str, str], ...] = ()  # (report group, regex of metric names), in order
    references: tuple[Reference, ...] = ()
    check: Optional[Callable[[Any], list[str]]] = None  # further config checks of the options (packages, files)
    recoveries: tuple[Recovery, ...] = ()  # the attacks it runs, each measured against the base model

    def __call__(self, ctx: SuiteContext, data: dict[str, list[dict]], **options: Any) -> dict:
        """Run the suite: ``{"metrics": {name: float}, "raw": {name: per-example list}}``, optionally ``"parts":
        {metric: [metric names]}`` (what an aggregate such as model_utility is made of) and ``"info": {name:
        str}`` (how it measured, e.g. the quantization scheme; shown under the report's tables)."""
        return self.fn(ctx, data, self.options(**options))

    def sources(self, options: Optional[BaseModel] = None) -> tuple[str, ...]:
        """The data sources this suite reads with these options."""
        return self.needs(options or self.options()) if callable(self.needs) else self.needs

    def group_of(self, metric: str) -> Optional[str]:
        if metric == WORST_RECOVERY or any(r.metric == metric for r in self.recoveries):
            return ROBUSTNESS
        return next((g for g, pattern in self.groups if re.match(pattern, metric)), None)


SUITES: Registry[Suite] = Registry("evaluation suite", package="jobs.evaluate")


def register_suite(
    name: str,
    *,
    needs: Union[tuple[str, ...], Callable[[Any], tuple[str, ...]]] = (),
    options: type[BaseModel] = NoOptions,
    path_options: tuple[str, ...] = (),
    groups: tuple[tuple[str, str], ...] = (),
    references: tuple[Reference, ...] = (),
    check: Optional[Callable[[Any], list[str]]] = None,
    recoveries: tuple[Recovery, ...] = (),
) -> Callable[[SuiteFn], Suite]:
    """Decorator: declare ``fn(ctx, data, opts)`` as the evaluation suite ``name`` (see the module doc)."""
    unknown = [s for s in (needs if isinstance(needs, tuple) else ()) if s not in SOURCES and not is_eval_set(s)]
    if unknown:
        raise ValueError(f"suite {name!r}: needs unknown data source(s) {unknown}; known: {', '.join(SOURCES)}")

    def deco(fn: SuiteFn) -> Suite:
        suite = Suite(name, fn, needs, options, path_options, groups, references, check, recoveries)
        SUITES.add(name, suite)
        return suite

    return deco


def get_suite(name: str) -> Suite:
    """The suite registered as ``name``; ``KeyError`` naming the known suites otherwise."""
    return SUITES.get(name)


def metric_group(metric: str) -> Optional[str]:
    """The report group the suites declare for ``metric`` (the first suite, in name order, whose patterns
    match it); None when no suite claims it."""
    return next((g for s in SUITES.units() if (g := s.group_of(metric)) is not None), None)


def add_reference_metrics(
    results: dict[str, dict[str, Any]], reference: str = "oracle", base: Optional[dict[str, Any]] = None
) -> None:
    """Added in place to each model's ``metrics`` where it and the other model have what it needs: every
    suite's ``references`` (``forget_quality``, ``privleak``, ...) against the ``reference`` model, and every
    suite's ``recoveries`` (``quant4_recovery``, ...) against the base model (``results["base"]``, or ``base``
    where the base is not among ``results``) with ``worst_recovery``, their largest, for every model but the
    base itself."""
    ref = results.get(reference)
    units = SUITES.units()
    if ref is not None:
        for suite in units:
            for r in suite.references:
                for res in results.values():
                    value = r.compute(res, ref)
                    if value is not None:
                        res["metrics"][r.metric] = value
    base = results.get("base", base)
    if base is None:
        return
    for res in results.values():
        if res is base:
            continue
        found = {r.metric: v for s in units for r in s.recoveries if (v := r.compute(res, base)) is not None}
        res["metrics"].update(found)
        if found:
            res["metrics"][WORST_RECOVERY] = max(found.values())


def read_jsonl(path: str, max_examples: int | None = None) -> list[dict]:
    """Records of a JSON-lines file (blank lines skipped), the first ``max_examples`` if given."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if max_examples is None else rows[:max_examples]


def is_forget_split(name: str) -> bool:
    """Forget-style splits ("forget", "forget_<subset>") aggregate truth ratios closer-to-1."""
    return name == "forget" or name.startswith("forget_")


def is_qa_split(records: Sequence[dict]) -> bool:
    """Question/answer records (string ``answer``): not multiple-choice rows or plain text."""
    return all(isinstance(r.get("question"), str) and isinstance(r.get("answer"), str) for r in records)


def evaluate_model(
    model_path: str,
    splits: dict[str, str],
    suites: Sequence[str] = ("qa",),
    template: PromptLike = DEFAULT_TEMPLATE,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_length: int = 128,
    max_examples: int | None = None,
    dtype: str = "float32",
    suite_options: dict[str, dict[str, Any]] | None = None,
    attn_implementation: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | None = None,
    progress: Callable[[str, str, int, int], None] | None = None,
) -> dict:
    """Load the model folder and score it on every suite over every split (jsonl paths).

    ``suite_options`` maps a suite name to its options (e.g. ``{"lmeval": {"tasks": [...]}}``,
    ``{"mc": {"attributes": [...]}}``). Self-contained (runs inside a Ray task). Returns ``{"metrics":
    {str: float}, "raw": {str: list}, "parts": {metric: [the metrics it aggregates]}, "info": {str: str},
    "n_examples": {split: int},
    "seconds": float, "tokens": int, "params": int, "placement": str}``: ``tokens`` counts every token position
    the model's forward passes took (padding excluded; a generated token is one), for the cost report's 2 x
    params x tokens; ``placement`` says where the weights went. Metrics against the oracle need two models: the
    caller adds them (``add_reference_metrics``).

    Where the model goes (``jobs.evaluate.placement.place_for_eval``): with CUDA, a device map planned over
    every visible GPU (the ones the task reserved; whole on cuda:0 when it fits there), a ``PlacementError``
    when they cannot hold it; without, the CPU. ``max_memory`` ({GPU index, "cpu": bytes or "20GiB"}) plans
    over those devices instead, and "disk" too with an ``offload_folder``. The task's log says where each
    module went. ``progress(suite, what, rows done, rows of the pass)`` follows each scoring pass.
    """
    from jobs.evaluate.placement import place_for_eval
    from jobs.evaluate.scoring import reporting
    from jobs.models import load_tokenizer

    start = time.perf_counter()
    suite_options = suite_options or {}
    # fail on an unknown suite or a bad option before loading anything
    runs = [(get_suite(s), suite_options.get(s, {})) for s in suites]
    for suite, opts in runs:
        suite.options(**opts)
    data = {name: read_jsonl(path, max_examples) for name, path in splits.items()}
    tokenizer = load_tokenizer(model_path)
    model, placement = place_for_eval(model_path, dtype, attn_implementation, max_memory, offload_folder)
    print(f"eval {model_path}: {placement}", flush=True)
    model.eval()
    tokens = count_tokens(model)
    ctx = SuiteContext(model, tokenizer, template, batch_size, max_new_tokens, max_length)
    result: dict[str, Any] = {"metrics": {}, "raw": {}, "parts": {}, "info": {}}
    for suite, opts in runs:
        report = (lambda what, done, total, name=suite.name: progress(name, what, done, total)) if progress else None
        with reporting(report):
            res = suite(ctx, data, **opts)
        for key in result:
            result[key].update(res.get(key, {}))
    result["n_examples"] = {name: len(rows) for name, rows in data.items()}
    result["seconds"] = time.perf_counter() - start
    result["tokens"], result["params"] = int(tokens[0]), sum(p.numel() for p in model.parameters())
    result["placement"] = placement
    return result


def count_tokens(model: Any) -> list[int]:
    """A one-element list that counts the token positions of every forward pass of ``model`` from now on
    (the attention mask's ones, else every input id; a copy of the model made later counts into it too)."""
    counter = [0]

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and getattr(mask, "dim", lambda: 0)() == 2 and ids is not None and mask.shape == ids.shape:
            counter[0] += int(mask.sum())
        elif ids is not None:
            counter[0] += int(ids.numel())
        elif kwargs.get("inputs_embeds") is not None:
            counter[0] += int(kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return counter
