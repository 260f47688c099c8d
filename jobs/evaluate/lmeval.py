"""Standard benchmarks through lm-evaluation-harness (the ``lmeval`` suite; ``pip install 'spunge[lmeval]'``).

The suite hands the already-loaded model to ``lm_eval.simple_evaluate`` as
``HFLM(pretrained=model, tokenizer=tokenizer)`` and names the tasks with a ``TaskManager``. Offline use:
``include_path`` is a folder of task YAMLs (``dataset_path: json`` with ``dataset_kwargs: {data_files:
...}`` over local JSONL) and only those tasks are indexed (``include_defaults=False``). The built-in task
``spunge_mc`` (``lm_eval_tasks/spunge_mc.yaml``) scores the pipeline's ``mc`` split: the suite writes the
split and a copy of the YAML (absolute path, prompt = the pipeline's template) to a temporary folder.

Metrics: ``lmeval.<task>.<metric>`` (``acc``, ``acc_norm``, ``acc_stderr``, ...; a filter other than
``none`` is appended: ``exact_match_strict``). lm_eval is imported only when the suite runs.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from jobs.data.format import DEFAULT_TEMPLATE, PromptLike, as_format
from jobs.evaluate.suites import SuiteContext, register_suite

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
MC_TASK = "spunge_mc"
SKIP = {"sample_len", "alias"}  # bookkeeping in lm-eval's results, not metrics


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or ``ImportError`` saying how to install the extra."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError("the 'lmeval' suite needs lm-evaluation-harness: pip install 'spunge[lmeval]'") from None
    return lm_eval


def jinja_prompt(template: PromptLike) -> str:
    """The pipeline's prompt template (``{question}``) as an lm-eval ``doc_to_text`` Jinja string; with a
    chat format just the question (lm-eval's ``apply_chat_template`` makes it the user turn)."""
    fmt = as_format(template)
    return "{{question}}" if fmt.chat else fmt.template.replace("{question}", "{{question}}")


def write_mc_task(
    folder: str | Path, records: list[dict], template: PromptLike = DEFAULT_TEMPLATE, task: str = MC_TASK
) -> Path:
    """Write ``records`` (question/choices/answer rows) as ``<folder>/<task>.jsonl`` and the task YAML
    (``lm_eval_tasks/spunge_mc.yaml`` with that file's absolute path and ``template`` as the prompt);
    returns the folder, ready to be an ``include_path``."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({k: r[k] for k in ("question", "choices", "answer")}) + "\n")
    spec = yaml.safe_load((TASKS_DIR / f"{MC_TASK}.yaml").read_text(encoding="utf-8"))
    spec.update(
        task=task, doc_to_text=jinja_prompt(template), dataset_kwargs={"data_files": {"test": str(data.resolve())}}
    )
    (folder / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return folder


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``simple_evaluate(...)["results"]`` as ``{"lmeval.<task>.<metric>": float}`` (finite numbers only)."""
    out: dict[str, float] = {}
    for task, res in results.items():
        for key, v in res.items():
            if key in SKIP or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            metric, _, flt = key.partition(",")
            name = metric if flt in ("", "none") else f"{metric}_{flt}"
            out[f"lmeval.{task}.{name}"] = float(v)
    return out


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    include_path: Optional[list[str]] = None,
    include_defaults: Optional[bool] = None,
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 32,
    max_length: Optional[int] = None,
    template: PromptLike = DEFAULT_TEMPLATE,
) -> dict:
    """``lm_eval.simple_evaluate`` on the in-memory model; returns its result dict (``results``, ...).
    ``include_defaults`` defaults to False when ``include_path`` is given (offline: index only those).
    A chat ``template`` runs lm-eval with ``apply_chat_template`` (and the format's system prompt)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path or []]
    if include_defaults is None:
        include_defaults = not paths
    tm = TaskManager(include_path=paths or None, include_defaults=include_defaults)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    fmt = as_format(template)
    res = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=tm,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="ERROR",
        apply_chat_template=fmt.chat,
        system_instruction=fmt.system_prompt if fmt.chat else None,
    )
    if res is None:  # only on non-zero ranks under distributed lm-eval
        return {"results": {}}
    return res


class LmEvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(
        default_factory=lambda: [MC_TASK], description=f"lm-eval task names; {MC_TASK} scores data.mc"
    )
    include_path: Optional[str] = Field(None, description="folder of task YAMLs (offline: only these are indexed)")
    include_defaults: Optional[bool] = Field(
        None, description="also index lm-eval's own tasks (default: only without include_path)"
    )
    limit: Optional[float] = Field(None, gt=0, description="examples per task (a fraction if < 1)")
    num_fewshot: Optional[int] = Field(None, ge=0)


def check_options(opts: LmEvalOptions) -> list[str]:
    """What the config can check before any task runs: the package, the task folder."""
    from jobs.extras import missing

    problems = [p for p in [missing("lm_eval", "the lmeval suite (lm-evaluation-harness)")] if p]
    if opts.include_path and not Path(opts.include_path).is_dir():
        problems.append(f"include_path: no such folder {opts.include_path} (expected task YAMLs)")
    return problems


@register_suite(
    "lmeval",
    needs=lambda opts: ("mc",) if MC_TASK in opts.tasks else (),
    options=LmEvalOptions,
    path_options=("include_path",),
    check=check_options,
)
def lmeval_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: LmEvalOptions) -> dict:
    """lm-eval tasks on the model: ``lmeval.<task>.<metric>``; ``raw["lmeval_results"]`` is lm-eval's
    ``results`` dict. ``tasks`` defaults to ``[spunge_mc]`` (the ``mc`` split, written to a temporary
    task folder); other task names are looked up in ``include_path`` (and lm-eval's own tasks when
    ``include_defaults`` or no ``include_path``)."""
    tasks, include_defaults = list(opts.tasks or [MC_TASK]), opts.include_defaults
    paths = [opts.include_path] if opts.include_path else []
    require_lm_eval()
    with tempfile.TemporaryDirectory(prefix="spunge-lmeval-") as tmp:
        if MC_TASK in tasks:
            if not data.get("mc"):
                raise ValueError(
                    f"lm-eval task {MC_TASK!r} scores the 'mc' split (data.mc), which is empty or "
                    f"missing; got {sorted(data)}"
                )
            paths.append(str(write_mc_task(tmp, data["mc"], ctx.template)))
            if include_defaults is None and len(paths) == 1:
                include_defaults = False
        res = run_lm_eval(
            ctx.model,
            ctx.tokenizer,
            tasks,
            paths,
            include_defaults,
            opts.limit,
            opts.num_fewshot,
            ctx.batch_size,
            template=ctx.template,
        )
    results = res.get("results", {})
    return {"metrics": flatten_results(results), "raw": {"lmeval_results": results}}
