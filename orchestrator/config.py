"""The pipeline config: pydantic v2 models loaded from YAML, ``extra="forbid"`` everywhere.

Relative paths in a config file are resolved against the file's folder. ``load_config`` returns a
validated ``PipelineConfig`` or raises ``ConfigError`` carrying one line per problem, each naming the
field path (``unlearn.optimizer.lr: Input should be greater than 0``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.data.format import CHAT, DEFAULT_TEMPLATE, PromptFormat
from jobs.models import ModelLoadError, check_model_dir
from jobs.localize import LocalizeSpec
from jobs.spec import LoraSpec, OptimizerSpec

Dtype = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """Bad config: ``problems`` holds one 'field.path: what was expected' line each."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Section):
    path: str = Field(description="Hugging Face model folder or hub name")
    dtype: Dtype = "float32"
    allow_pickle: bool = Field(False, description="accept *.bin (pickle) checkpoints; safetensors only otherwise")
    attn_implementation: Optional[Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"]] = Field(
        None, description="attention kernel (transformers' attn_implementation); default: transformers' choice")


class DataSource(_Section):
    """A dataset: local json/jsonl/parquet/csv file(s), or a Hugging Face hub dataset name."""

    path: Union[str, list[str]]
    format: Literal["auto", "json", "jsonl", "parquet", "csv", "hub"] = "auto"
    name: Optional[str] = Field(None, description="hub dataset config name")
    split: str = "train"


class Columns(_Section):
    question: str = "question"
    answer: str = "answer"
    paraphrased_answer: str = "paraphrased_answer"
    perturbed_answers: str = "perturbed_answers"
    text: str = "text"


class DataConfig(_Section):
    forget: DataSource
    retain: Optional[DataSource] = None
    holdout: Optional[DataSource] = None
    general: Optional[DataSource] = None
    mc: Optional[DataSource] = Field(
        None, description="multiple-choice eval set (mc suite): question, choices (list), answer (index), attributes")
    columns: Columns = Field(default_factory=Columns)
    template: str = Field(DEFAULT_TEMPLATE, description="prompt with {question}, or 'chat': the tokenizer's "
                          "chat template (question as the user turn, answer as the assistant turn)")
    system_prompt: Optional[str] = Field(None, description="template chat: the system turn (default: the "
                                         "chat template's own)")
    answer_eos: bool = Field(True, description="answers end with EOS (chat: the end-of-turn) in training and "
                             "scoring; off for facts learned in pretraining (WMDP/RWKU-style)")

    def prompt_format(self) -> PromptFormat:
        return PromptFormat(template=self.template, system_prompt=self.system_prompt, answer_eos=self.answer_eos)

    @field_validator("forget", "retain", "holdout", "general", "mc", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, (str, list)) else v

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v != CHAT and "{question}" not in v:
            raise ValueError("must contain '{question}', or be 'chat' (the tokenizer's chat template)")
        return v

    @model_validator(mode="after")
    def _system_prompt(self):
        if self.system_prompt is not None and self.template != CHAT:
            raise ValueError("system_prompt needs template: chat (a plain template holds its own text)")
        return self


class SplitConfig(_Section):
    attribute: str = Field(description="forget-set column to split by")
    groups: Optional[dict[str, list[Any]]] = Field(
        None, description="explicit subsets: name -> attribute values; default one subset per value"
    )
    baseline: Literal["unsplit", "none"] = "unsplit"

    @field_validator("groups")
    @classmethod
    def _groups(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must name at least one group")
            for name, values in v.items():
                if not values:
                    raise ValueError(f"group {name!r} lists no values")
        return v


class UnlearnConfig(_Section):
    method: str = "npo"
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own parameters")
    retain_source: Literal["retain", "general"] = Field(
        "retain", description="what the retain term trains on: the in-distribution retain set or general text")
    optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(lr=1e-5))
    localize: Optional[LocalizeSpec] = Field(None, description="attribution mask: only masked parameters train")
    lora: Optional[LoraSpec] = Field(None, description="train LoRA adapters (peft) instead of the full weights")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(8, gt=0, description="micro batch per worker")
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(128, gt=8)
    seed: int = 0
    report_interval_s: float = Field(5.0, ge=0, description="seconds between reports; each carries every step since the last")
    checkpoint_every: Optional[int] = Field(
        None, gt=0, description="steps between resumable DeepSpeed checkpoints (null: none); not part of the stage hash")


class ScalingConfig(_Section):
    num_workers: int = Field(1, gt=0, description="Ray Train workers per unlearning job")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    use_gpu: bool = False
    memory_per_worker_gb: Optional[float] = Field(
        None, gt=0, description="RAM one worker needs (Ray's memory resource): fewer jobs run at once, none is "
                                "OOM-killed (a 135M fp32 NPO worker holds ~4 GiB)")
    max_concurrent_jobs: Optional[int] = Field(None, gt=0, description="default: as many as resources allow")
    max_failures: Optional[int] = Field(
        None, ge=-1, description="worker-group restarts per job (Ray Train FailureConfig); -1: unlimited; "
                                 "default 2 with unlearn.checkpoint_every, else 0")

    @model_validator(mode="after")
    def _gpus(self):
        if self.use_gpu and self.gpus_per_worker == 0:
            self.gpus_per_worker = 1
        return self


class MergeConfig(_Section):
    method: str = "ties"
    parameters: dict[str, Any] = Field(default_factory=dict, description="mergekit global parameters")
    model_parameters: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per subset")
    output: Literal["full", "adapter"] = Field(
        "full", description="with unlearn.lora: write the merged full model, or a peft adapter of the merged delta")


class LmEvalConfig(_Section):
    """The ``lmeval`` suite (``pip install 'spunge[lmeval]'``): lm-evaluation-harness tasks."""

    tasks: list[str] = Field(default_factory=lambda: ["spunge_mc"],
                             description="lm-eval task names; spunge_mc scores data.mc")
    include_path: Optional[str] = Field(None, description="folder of task YAMLs (offline: only these are indexed)")
    include_defaults: Optional[bool] = Field(None, description="also index lm-eval's own tasks (default: "
                                             "only without include_path)")
    limit: Optional[float] = Field(None, gt=0, description="examples per task (a fraction if < 1)")
    num_fewshot: Optional[int] = Field(None, ge=0)


class EvalConfig(_Section):
    suites: list[str] = Field(default_factory=lambda: ["qa"])
    mc_attributes: Optional[list[str]] = Field(
        None, description="mc suite: attribute columns for mc_acc.<attribute>.<value> (default: every other column)")
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)

    stop: list[str] = Field(default_factory=list, description="qa suite: strings that end a greedy answer "
                            "(EOS and a chat end-of-turn always do), e.g. ['\\n']")

    def suite_options(self, suite: str) -> dict[str, Any]:
        """Extra keyword arguments of one suite (``EvalSpec.suite_options[suite]``)."""
        if suite == "qa" and self.stop:
            return {"stop": list(self.stop)}
        if suite == "mc" and self.mc_attributes is not None:
            return {"attributes": list(self.mc_attributes)}
        if suite == "lmeval":
            return self.lm_eval.model_dump(exclude_none=True)
        return {}
    oracle: Optional[str] = Field(None, description="retain-only model folder: reference for forget_quality")
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    max_examples: Optional[int] = Field(None, gt=0, description="cap per split (quick runs)")
    cpus_per_task: float = Field(1, gt=0)
    gpus_per_task: float = Field(0, ge=0)


class TrackingConfig(_Section):
    uri: Optional[str] = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = "spunge"
    log_models: bool = Field(True, description="log the merged model folder as an MLflow artifact")


class StorageConfig(_Section):
    output_dir: str = "spunge-output"


class RayConfig(_Section):
    address: Optional[str] = Field(None, description="None: start a local Ray; 'auto' or ray://...: connect")
    num_cpus: Optional[int] = Field(None, gt=0, description="logical CPUs of a local Ray (default 2 x cores)")


class PipelineConfig(_Section):
    name: str = "spunge"
    model: ModelConfig
    data: DataConfig
    split: SplitConfig
    unlearn: UnlearnConfig = Field(default_factory=UnlearnConfig)
    deepspeed: Union[dict[str, Any], str] = Field(
        default_factory=lambda: {"zero_optimization": {"stage": 0}},
        description="DeepSpeed config: inline dict or path to a JSON file",
    )
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def deepspeed_dict(self) -> dict[str, Any]:
        if isinstance(self.deepspeed, dict):
            return self.deepspeed
        return json.loads(Path(self.deepspeed).read_text())


# ---------------------------------------------------------------------------------------------------
# loading and checking

_PATH_FIELDS = (("model", "path"), ("eval", "oracle"), ("storage", "output_dir"))
_NESTED_PATH_FIELDS = (("eval", "lm_eval", "include_path"),)


def _resolve(raw: dict, base: Path) -> dict:
    """Make relative local paths absolute against the config's folder (hub names are left alone)."""

    def fix(p: Any) -> Any:
        if isinstance(p, str) and p and not Path(p).is_absolute() and (base / p).exists():
            return str((base / p).resolve())
        return p

    for section, key in _PATH_FIELDS:
        sec = raw.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = str((base / sec[key]).resolve()) if key == "output_dir" and sec[key] else fix(sec[key])
    data = raw.get("data")
    if isinstance(data, dict):
        for name in ("forget", "retain", "holdout", "general", "mc"):
            src = data.get(name)
            if isinstance(src, (str, list)):
                src = data[name] = {"path": src}
            if isinstance(src, dict) and "path" in src:
                src["path"] = [fix(p) for p in src["path"]] if isinstance(src["path"], list) else fix(src["path"])
    for section, sub, key in _NESTED_PATH_FIELDS:
        node = (raw.get(section) or {}).get(sub) if isinstance(raw.get(section), dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = fix(node[key])
    if isinstance(raw.get("deepspeed"), str):
        raw["deepspeed"] = fix(raw["deepspeed"])
    unlearn = raw.get("unlearn")
    if isinstance(unlearn, dict) and isinstance(unlearn.get("params"), dict):
        _resolve_method_paths(unlearn, fix)
    return raw


def _resolve_method_paths(unlearn: dict, fix: Any) -> None:
    """The method's file params (``Method.path_params``, e.g. whp's ``anchors``) resolve like data paths."""
    from jobs.unlearn.methods import get_method

    try:
        method = get_method(str(unlearn.get("method", UnlearnConfig().method)))
    except KeyError:
        return  # check_config names the unknown method
    for key in method.path_params:
        if isinstance(unlearn["params"].get(key), str):
            unlearn["params"][key] = fix(unlearn["params"][key])


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def parse_config(raw: Any, base_dir: str | Path = ".", source: str = "config") -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a YAML mapping at the top level, got {type(raw).__name__}"], source)
    raw = _resolve(json.loads(json.dumps(raw)), Path(base_dir))
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([f"{_loc(err)}: {err['msg']}" for err in e.errors()], source) from None
    problems = check_config(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(["no such file (expected a pipeline YAML)"], str(path))
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {str(e).splitlines()[0]}"], str(path)) from None


def load_config(path: str | Path, overrides: Optional[dict] = None) -> PipelineConfig:
    """One pipeline config (a file with ``variants:`` is loaded with ``load_configs``)."""
    raw = _read_yaml(path)
    if isinstance(raw, dict) and "variants" in raw:
        raise ConfigError(["variants: this file describes several pipelines; use load_configs"], str(path))
    # a ``tune:`` section is for ``spunge tune`` (orchestrator/tune.py): checked here, ignored by a plain run
    tune_raw = raw.pop("tune", None) if isinstance(raw, dict) else None
    if overrides:
        raw = apply_overrides(raw, overrides)
    cfg = parse_config(raw, Path(path).parent.resolve(), str(path))
    if tune_raw is not None:
        from orchestrator.tune import parse_tune

        parse_tune(tune_raw, cfg, str(path))
    return cfg


def load_configs(path: str | Path, overrides: Optional[dict] = None) -> list[tuple[Optional[str], PipelineConfig]]:
    """The pipelines a file describes: itself, or one per entry of its ``variants:`` mapping.

    ``variants: {name: {dotted.path: value, ...}}`` runs the rest of the file once per variant with those
    fields changed; each variant gets the name ``<name>/<variant>`` and ``<output_dir>/<variant>``.
    Every variant is validated up front; problems name the variant (``variants.ga_kl.unlearn.method: ...``).
    """
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or "variants" not in raw:
        return [(None, load_config(path, overrides))]
    variants = raw.pop("variants")
    if "tune" in raw:
        raise ConfigError(["tune: a tune section cannot be combined with variants (tune one pipeline)"], str(path))
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(["variants: expected a mapping of variant name -> {dotted.path: value}"], str(path))
    if overrides:
        raw = apply_overrides(raw, overrides)
    # like a single pipeline: a configured output_dir is relative to the file, the default to the cwd
    base_out = Path(raw.get("storage", {}).get("output_dir") or Path(StorageConfig().output_dir).resolve())
    out, problems = [], []
    for name, changes in variants.items():
        if not isinstance(changes, dict):
            problems.append(f"variants.{name}: expected a mapping of dotted.path -> value")
            continue
        vraw = apply_overrides(raw, {**changes, "name": f"{raw.get('name', 'spunge')}/{name}",
                                     "storage.output_dir": str(base_out / str(name))})
        try:
            out.append((str(name), parse_config(vraw, Path(path).parent.resolve(), str(path))))
        except ConfigError as e:
            problems += [f"variants.{name}.{p}" for p in e.problems]
    if problems:
        raise ConfigError(problems, str(path))
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted paths (``unlearn.optimizer.lr``) in a raw config dict."""
    raw = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def check_config(cfg: PipelineConfig) -> list[str]:
    """Cross-field checks that need the registries: method, method params, merge method, suites, files."""
    from jobs.evaluate import SUITES
    from jobs.merge import merge_method_names
    from jobs.unlearn.methods import build_method

    problems: list[str] = []
    try:
        method = build_method(cfg.unlearn.method, cfg.unlearn.params)
    except KeyError as e:
        problems.append(f"unlearn.method: {e.args[0]}")
    except ValidationError as e:
        problems += [f"unlearn.params.{_loc(err)}: {err['msg']}" for err in e.errors()]
    else:
        source = cfg.unlearn.retain_source
        if getattr(cfg.data, source) is None and (method.uses_retain() or source == "general"):
            problems.append(f"data.{source}: method {cfg.unlearn.method!r} with unlearn.retain_source "
                            f"{source!r} (and these params) trains on it, but it is not set")
    names = merge_method_names()
    if cfg.merge.method not in names:
        problems.append(f"merge.method: unknown mergekit method {cfg.merge.method!r}; known: {', '.join(names)}")
    for i, suite in enumerate(cfg.eval.suites):
        if suite not in SUITES:
            problems.append(f"eval.suites.{i}: unknown suite {suite!r}; known: {', '.join(sorted(SUITES))}")
    problems += _check_eval_data(cfg)
    problems += _check_model_features(cfg)
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
    for name in ("forget", "retain", "holdout", "general", "mc"):
        src: Optional[DataSource] = getattr(cfg.data, name)
        if src is None or src.format == "hub":
            continue
        for p in [src.path] if isinstance(src.path, str) else src.path:
            if _looks_local(p) and not Path(p).exists():
                problems.append(f"data.{name}.path: no such file {p}")
    return problems


def _check_eval_data(cfg: PipelineConfig) -> list[str]:
    """The data and packages the mc, perplexity and lmeval suites need."""
    import importlib.util

    suites, problems = cfg.eval.suites, []
    lm = cfg.eval.lm_eval
    if cfg.data.mc is None and ("mc" in suites or ("lmeval" in suites and "spunge_mc" in lm.tasks)):
        problems.append("data.mc: the mc suite (and lm-eval task spunge_mc) needs a multiple-choice file "
                        "(question, choices, answer), but it is not set")
    if "perplexity" in suites and cfg.data.general is None:
        problems.append("data.general: the perplexity suite needs general text (records with 'text'), "
                        "but it is not set")
    if "lmeval" in suites:
        if importlib.util.find_spec("lm_eval") is None:
            problems.append("eval.suites: the lmeval suite needs lm-evaluation-harness: pip install 'spunge[lmeval]'")
        if lm.include_path and not Path(lm.include_path).is_dir():
            problems.append(f"eval.lm_eval.include_path: no such folder {lm.include_path} (expected task YAMLs)")
    return problems


def _check_model_features(cfg: PipelineConfig) -> list[str]:
    """The chat template, the attention kernel and LoRA against what the model and packages offer."""
    import importlib.util

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
        package = "flash_attn_interface" if attn.endswith("_3") else "flash_attn"
        if importlib.util.find_spec(package) is None:
            problems.append(f"model.attn_implementation: {attn} needs the {package} package (and a GPU); "
                            "use sdpa or eager")
    u, m = cfg.unlearn, cfg.merge
    if u.lora is not None and u.localize is not None:
        problems.append("unlearn.localize: cannot be combined with unlearn.lora (a mask selects full weights; "
                        "LoRA trains adapters)")
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
            problems.append(f"merge.output: adapter: method {u.method!r} rewrites the merged weights "
                            "(e.g. tvn merge_then_negate); use merge.output: full")
        # a method that makes new weights at the end (tvn) outputs full models; the merge takes adapters
        # unless it merges those outputs
        full_outputs = method.finalizes() and method.merge_input() is None
        if not full_outputs and m.method not in LORA_METHODS:
            problems.append(f"merge.method: {m.method!r} cannot merge LoRA adapters (unlearn.lora); "
                            f"use one of {', '.join(LORA_METHODS)}")
    return problems


def _looks_local(p: str) -> bool:
    """A path (absolute, ./, ../, or with a file suffix) rather than a hub name like 'org/name'."""
    return p.startswith(("/", ".", "~")) or Path(p).suffix in {".json", ".jsonl", ".parquet", ".csv"}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts/lists into dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, (dict, list)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


def config_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
