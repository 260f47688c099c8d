"""The checks of a pipeline config that go beyond its schema: names looked up in the registries (method,
merge method, suites), what each suite needs, files and folders that must exist, and combinations of
features the model or the packages cannot serve. ``orchestrator.config.parse.parse_config`` runs them; each
problem is one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from jobs.data.format import CHAT
from jobs.models import ModelLoadError, check_model_dir
from orchestrator.config.schema import PipelineConfig


def field_path(err: dict) -> str:
    """The dotted field path of a pydantic error."""
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def check_config(cfg: PipelineConfig) -> list[str]:
    """Cross-field checks that need the registries: method, method params, merge method, suites, files."""
    from jobs.merge import merge_method_names
    from jobs.unlearn.methods import build_method

    problems: list[str] = []
    try:
        method = build_method(cfg.unlearn.method, cfg.unlearn.params)
    except KeyError as e:
        problems.append(f"unlearn.method: {e.args[0]}")
    except ValidationError as e:
        problems += [f"unlearn.params.{field_path(err)}: {err['msg']}" for err in e.errors()]
    else:
        source = cfg.unlearn.retain_source
        if getattr(cfg.data, source) is None and (method.uses_retain() or source == "general"):
            problems.append(
                f"data.{source}: method {cfg.unlearn.method!r} with unlearn.retain_source "
                f"{source!r} (and these params) trains on it, but it is not set"
            )
    names = merge_method_names()
    if cfg.merge.method not in names:
        problems.append(f"merge.method: unknown mergekit method {cfg.merge.method!r}; known: {', '.join(names)}")
    problems += _check_suites(cfg)
    problems += check_select(cfg)
    problems += _check_model_features(cfg)
    problems += _check_batch(cfg)
    problems += _check_gpus(cfg)
    problems += _check_in_process(cfg)
    if isinstance(cfg.deepspeed, str):
        try:
            ds = cfg.deepspeed_dict()
            if not isinstance(ds, dict):
                problems.append(f"deepspeed: {cfg.deepspeed} must hold a JSON object")
        except FileNotFoundError:
            problems.append(f"deepspeed: no such file {cfg.deepspeed} (expected a DeepSpeed JSON config)")
        except json.JSONDecodeError as e:
            problems.append(f"deepspeed: {cfg.deepspeed} is not valid JSON ({e.msg} at line {e.lineno})")
    for field, path in (("model.path", cfg.model.path), ("eval.oracle", cfg.eval.oracle)):
        if path and _looks_local(path) and not Path(path).exists():
            problems.append(f"{field}: no such folder {path}")
        elif path and Path(path).exists():
            try:
                check_model_dir(path, cfg.model.allow_pickle)
            except ModelLoadError as e:
                problems.append(f"{field}: {e}")
    for name, src in cfg.data.sources().items():
        for i, leaf in enumerate(src.leaves()):
            if leaf.format == "hub":
                continue
            field = f"data.{name}.path" if src.parts is None else f"data.{name}.parts.{i}.path"
            for p in [leaf.path] if isinstance(leaf.path, str) else leaf.path:
                if _looks_local(p) and not Path(p).exists():
                    problems.append(f"{field}: no such file {p}")
    return problems


def _check_suites(cfg: PipelineConfig) -> list[str]:
    """Every suite is registered, and the data sources and packages its declaration says it needs are there."""
    from jobs.evaluate.suites import SUITES, describe_source

    problems, present = [], set(cfg.data.sources())
    for i, name in enumerate(cfg.eval.suites):
        try:
            suite = SUITES.get(name)
        except KeyError as e:
            problems.append(f"eval.suites.{i}: {e.args[0]}")
            continue
        opts = suite.options(**cfg.eval.suite_options(name))
        for source in suite.sources(opts):
            if source not in present:
                problems.append(f"data.{source}: the {name} suite needs {describe_source(source)}, but it is not set")
        problems += [f"eval.{name}: {p}" for p in (suite.check(opts) if suite.check else [])]
    return problems


SELECT_SPLITS = ("forget", "retain", "holdout")  # what unlearn.select samples and scores at each step


def check_select(cfg: PipelineConfig) -> list[str]:
    """``unlearn.select``: a rule or patience needs ``unlearn.eval_every``; its suites exist, and read only
    the splits it samples; the rule's metrics come from those suites (checked when the first step is scored)."""
    from jobs.evaluate.suites import SUITES, describe_source

    sel, problems = cfg.unlearn.select, []
    if cfg.unlearn.eval_every is None and (sel.rule != "last" or sel.patience):
        problems.append("unlearn.select: a rule or patience scores evaluated steps; set unlearn.eval_every")
    if sel.patience and sel.rule == "last":
        problems.append("unlearn.select.patience: needs a rule (with rule: last no step is better than another)")
    present = set(cfg.data.sources())
    for i, name in enumerate(sel.suites):
        try:
            suite = SUITES.get(name)
        except KeyError as e:
            problems.append(f"unlearn.select.suites.{i}: {e.args[0]}")
            continue
        for source in suite.sources(suite.options(**cfg.eval.suite_options(name))):
            if source not in SELECT_SPLITS or source not in present:
                problems.append(
                    f"unlearn.select.suites.{i}: the {name} suite needs {describe_source(source)}; "
                    f"steps are scored on samples of {', '.join(s for s in SELECT_SPLITS if s in present)}"
                )
    return problems


def _check_model_features(cfg: PipelineConfig) -> list[str]:
    """The chat template, the attention kernel and LoRA against what the model and packages offer."""
    from jobs.extras import missing

    problems = []
    if cfg.data.template == CHAT and Path(cfg.model.path).is_dir():
        from jobs.data.format import FormatError, check_chat_template
        from jobs.models import load_tokenizer

        try:
            check_chat_template(load_tokenizer(cfg.model.path))
        except FormatError as e:
            problems.append(f"data.template: chat: {e}")
        except (OSError, ValueError) as e:
            problems.append(f"model.path: cannot load the tokenizer of {cfg.model.path} ({str(e).splitlines()[0]})")
    attn = cfg.model.attn_implementation
    if attn and attn.startswith("flash_attention"):
        if err := missing("flash_attn_interface" if attn.endswith("_3") else "flash_attn", attn):
            problems.append(f"model.attn_implementation: {err}; or use sdpa or eager")
    u, m = cfg.unlearn, cfg.merge
    if u.lora is not None and (err := missing("peft", "LoRA (unlearn.lora)")):
        problems.append(f"unlearn.lora: {err}")
    if u.lora is not None and u.localize is not None:
        problems.append(
            "unlearn.localize: cannot be combined with unlearn.lora (a mask selects full weights; LoRA trains adapters)"
        )
    if m.output == "adapter" and u.lora is None:
        problems.append("merge.output: adapter needs unlearn.lora (jobs that train adapters)")
    if u.lora is not None:
        from jobs.merge_lora import LORA_METHODS
        from jobs.unlearn.methods import build_method

        try:
            method = build_method(u.method, u.params)
        except (KeyError, ValidationError):
            return problems  # reported with unlearn.method / unlearn.params
        if m.output == "adapter" and method.rewrites_merge():
            problems.append(
                f"merge.output: adapter: method {u.method!r} rewrites the merged weights "
                "(e.g. tvn merge_then_negate); use merge.output: full"
            )
        # a method that makes new weights at the end (tvn) outputs full models; the merge takes adapters
        # unless it merges those outputs
        full_outputs = method.finalizes() and method.merge_input() is None
        if not full_outputs and m.method not in LORA_METHODS:
            problems.append(
                f"merge.method: {m.method!r} cannot merge LoRA adapters (unlearn.lora); "
                f"use one of {', '.join(LORA_METHODS)}"
            )
    return problems


def _check_batch(cfg: PipelineConfig) -> list[str]:
    """``unlearn.global_batch_size`` splits evenly over ``scaling.num_workers`` (and is not combined with an
    explicit accumulation)."""
    from jobs.unlearn.data import BatchSplitError, split_batch

    u = cfg.unlearn
    try:
        split_batch(u.batch_size, u.gradient_accumulation_steps, u.global_batch_size, cfg.scaling.ranks)
    except BatchSplitError as e:
        return [str(e)]
    return []


def _check_gpus(cfg: PipelineConfig) -> list[str]:
    """GPU combinations Ray would schedule but the GPUs cannot serve: an eval task on a GPU it did not reserve,
    two NCCL ranks of one job on one GPU, a fraction of GPUs Ray refuses."""
    s, e, problems = cfg.scaling, cfg.eval, []
    if s.use_gpu and s.num_workers > 1 and s.gpus_per_worker != int(s.gpus_per_worker):
        problems.append(
            f"scaling.gpus_per_worker: {s.gpus_per_worker} with num_workers {s.num_workers} can put two "
            "NCCL ranks of one job on one GPU, which NCCL refuses; use whole GPUs per worker, or "
            "num_workers: 1 to share GPUs between jobs"
        )
    if s.use_gpu and e.device == "auto" and e.gpus_per_task == 0:
        problems.append(
            "eval.gpus_per_task: 0 with scaling.use_gpu: true leaves each eval task's model on a GPU it "
            "did not reserve, beside the training workers; reserve 1 or more, or set eval.device: cpu"
        )
    if e.device == "cpu" and e.gpus_per_task:
        problems.append(
            f"eval.gpus_per_task: {e.gpus_per_task} with eval.device: cpu reserves GPUs the task hides; "
            "set 0 or eval.device: auto"
        )
    for field, value in (("eval.gpus_per_task", e.gpus_per_task), ("scaling.gpus_per_worker", s.gpus_per_worker)):
        if value and value > 1 and value != int(value):
            problems.append(
                f"{field}: {value} is a fraction above 1, which Ray cannot reserve; use a fraction "
                "below 1 or a whole number"
            )
    return problems


def _check_in_process(cfg: PipelineConfig) -> list[str]:
    """``num_workers: 0`` runs each job in its runner task: there is no Ray Train worker group to restart."""
    s = cfg.scaling
    if s.num_workers == 0 and s.max_failures:
        return [
            f"scaling.max_failures: {s.max_failures} restarts Ray Train workers, and num_workers: 0 has none "
            "(each job runs in its runner task's process); leave it unset or 0, or use num_workers: 1"
        ]
    return []


def _looks_local(p: str) -> bool:
    """A path (absolute, ./, ../, or with a file suffix) rather than a hub name like 'org/name'."""
    return p.startswith(("/", ".", "~")) or Path(p).suffix in {".json", ".jsonl", ".parquet", ".csv"}
