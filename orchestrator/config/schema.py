"""The pipeline config: pydantic v2 models loaded from YAML, ``extra="forbid"`` everywhere.

Relative paths in a config file are resolved against the file's folder. ``load_config`` returns a
validated ``PipelineConfig`` or raises ``ConfigError`` carrying one line per problem, each naming the
field path (``unlearn.optimizer.lr: Input should be greater than 0``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from jobs.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from jobs.spec import TrainingSpec
from orchestrator.config.data import DataConfig, SplitConfig
from orchestrator.config.data import Section as _Section
from orchestrator.config.objective import Objective

Dtype = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """Bad config: ``problems`` holds one 'field.path: what was expected' line each."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class ModelConfig(_Section):
    path: str = Field(description="Hugging Face model folder or hub name")
    dtype: Dtype = "float32"
    allow_pickle: bool = Field(False, description="accept *.bin (pickle) checkpoints; safetensors only otherwise")
    attn_implementation: Optional[Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"]] = Field(
        None, description="attention kernel (transformers' attn_implementation); default: transformers' choice"
    )


class StepRule(Objective):
    """``unlearn.select.rule``: the tune objective's form (a metric or weighted sum, ``mode``, constraints
    relative to the base model, ``penalty``), scored on each evaluated step of a job."""

    model: Literal["job"] = Field("job", description="the job's own model at each evaluated step")


class SelectConfig(_Section):
    """``unlearn.select``: which evaluated step of each job is its model (what the merge receives)."""

    rule: Union[Literal["last"], StepRule] = Field(
        "last", description="'last' or an objective over the step's eval metrics (as tune.objective)"
    )
    suites: list[str] = Field(default_factory=lambda: ["qa"], description="suites scored at each step")
    max_examples: int = Field(32, gt=0, description="rows sampled from each of forget/retain/holdout per job")
    seed: int = Field(0, description="which rows are sampled")
    patience: Optional[int] = Field(
        None,
        gt=0,
        description="stop a job after this many evaluated steps without a better one (early stopping); null: never",
    )
    keep: Literal["best", "all"] = Field(
        "best", description="snapshots kept on disk once scored: the best so far (and those not yet scored), or all"
    )


class UnlearnConfig(TrainingSpec):
    """The ``unlearn:`` section: the method and what its retain term trains on, and how the jobs train
    (``TrainingSpec``, the same fields every ``UnlearnSpec`` carries)."""

    method: str = "npo"
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own parameters")
    retain_source: Literal["retain", "general"] = Field(
        "retain", description="what the retain term trains on: the in-distribution retain set or general text"
    )
    select: SelectConfig = Field(default_factory=SelectConfig)


class ScalingConfig(_Section):
    num_workers: int = Field(
        1,
        ge=0,
        description="Ray Train workers per unlearning job; 0: none, the job runs as one rank in its runner "
        "task's process, which holds one worker's resources (as Ray Train's local mode: no controller, worker "
        "actors or restarts; for small jobs and debugging)",
    )
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    use_gpu: bool = False
    memory_per_worker_gb: Optional[float] = Field(
        None,
        gt=0,
        description="RAM one worker needs (Ray's memory resource): fewer jobs run at once, none is "
        "OOM-killed (a 135M fp32 NPO worker holds ~4 GiB)",
    )
    max_concurrent_jobs: Optional[int] = Field(None, gt=0, description="default: as many as resources allow")
    max_failures: Optional[int] = Field(
        None,
        ge=-1,
        description="worker-group restarts per job (Ray Train FailureConfig); -1: unlimited; "
        "default 2 with unlearn.checkpoint_every, else 0",
    )
    wait_for_resources_s: Optional[float] = Field(
        None,
        ge=0,
        description="how long the pipeline waits for the cluster to grow when one job (or one eval "
        "task) does not fit it now, having asked Ray's autoscaler for it; default 900 on "
        "a cluster (ray.address or --address), 0 on a local Ray spunge starts",
    )

    @model_validator(mode="after")
    def _gpus(self):
        if self.use_gpu and self.gpus_per_worker == 0:
            self.gpus_per_worker = 1
        return self

    @property
    def ranks(self) -> int:
        """A job's ranks, each holding one worker's resources: ``num_workers``, or 1 for ``num_workers: 0``."""
        return self.num_workers or 1


class MergeConfig(_Section):
    method: str = "ties"
    parameters: dict[str, Any] = Field(default_factory=dict, description="mergekit global parameters")
    model_parameters: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per subset")
    output: Literal["full", "adapter"] = Field(
        "full", description="with unlearn.lora: write the merged full model, or a peft adapter of the merged delta"
    )
    memory_gb: Optional[float] = Field(
        None,
        ge=0,
        description="RAM the merge actor reserves (Ray's memory resource) from the unlearn stage on; "
        "default: estimated from the base model's size, the subsets and the merge engine; "
        "0: none",
    )


class _EvalSection(_Section):
    """The ``eval:`` section: the suites, the limits every suite shares, the oracle, where the tasks run; and
    one section per suite that has options, ``eval.<suite>`` (the options model the suite declares, added
    to this class from the suite registry by ``_eval_config``)."""

    suites: list[str] = Field(default_factory=lambda: ["qa"])
    oracle: Optional[str] = Field(None, description="retain-only model folder: reference for forget_quality")
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    max_examples: Optional[int] = Field(None, gt=0, description="cap per split (quick runs)")
    cpus_per_task: float = Field(1, gt=0)
    gpus_per_task: Optional[float] = Field(
        None,
        ge=0,
        description="GPUs each eval task reserves; more than 1 spreads the model over them (a device "
        "map); default 1 with scaling.use_gpu (unless eval.device: cpu), else 0",
    )
    device: Literal["auto", "cpu"] = Field(
        "auto", description="auto: the GPUs the task reserved, else the CPU; cpu: the CPU, the GPUs hidden"
    )

    def suite_options(self, suite: str) -> dict[str, Any]:
        """One suite's options (``EvalSpec.suite_options[suite]``); {} for a suite without options."""
        opts = getattr(self, suite, None) if suite in type(self).model_fields else None
        return opts.model_dump(mode="json") if isinstance(opts, BaseModel) else {}


def _eval_config() -> type[_EvalSection]:
    """``EvalConfig``: ``_EvalSection`` plus a field ``<suite>`` per registered suite with options."""
    from jobs.evaluate.suites import SUITES, NoOptions

    sections = {}
    for suite in SUITES.units():
        if suite.options is NoOptions:
            continue
        if suite.name in _EvalSection.model_fields:
            raise ValueError(f"evaluation suite {suite.name!r} clashes with the eval.{suite.name} setting")
        sections[suite.name] = (
            suite.options,
            Field(default_factory=suite.options, description=f"options of the {suite.name} suite"),
        )
    return create_model("EvalConfig", __base__=_EvalSection, __module__=__name__, **sections)


EvalConfig = _eval_config()


class TrackingConfig(_Section):
    uri: Optional[str] = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = "spunge"
    log_models: bool = Field(True, description="log the merged model folder as an MLflow artifact")


class StorageConfig(_Section):
    output_dir: str = "spunge-output"
    max_shard_size: str = Field(
        DEFAULT_MAX_SHARD_SIZE,
        description="largest safetensors file of a written model "
        "(the merged one, each job's): larger models are shards with an index",
    )

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        try:
            ok = parse_size(value) > 0
        except ValueError:
            ok = False
        if not ok:
            raise PydanticCustomError(
                "shard_size",
                "expected a positive size such as 5GB, 500MB or 100KB (units "
                "KB, MB, GB, TB: powers of ten), got {value}",
                {"value": repr(value)},
            )
        return value


class RayConfig(_Section):
    address: Optional[str] = Field(None, description="None: start a local Ray; 'auto' or ray://...: connect")
    num_cpus: Optional[int] = Field(None, gt=0, description="logical CPUs of a local Ray (default 2 x cores)")
    start_timeout_s: float = Field(
        180,
        gt=0,
        description="how long a local Ray node, and a job's Ray Train "
        "worker group, may take to start (a loaded machine is slow)",
    )


class ReportConfig(_Section):
    pretraining_tokens: Optional[float] = Field(
        None,
        gt=0,
        description="tokens the model was pretrained on, for the cost report's retraining estimate "
        "(6 x params x tokens); default: a table of known models by name",
    )


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
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _eval_gpus(self):
        if self.eval.gpus_per_task is None:
            self.eval.gpus_per_task = 1 if self.scaling.use_gpu and self.eval.device == "auto" else 0
        return self

    def deepspeed_dict(self) -> dict[str, Any]:
        if isinstance(self.deepspeed, dict):
            return self.deepspeed
        return json.loads(Path(self.deepspeed).read_text())


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


def redact_uri(uri: Optional[str]) -> Optional[str]:
    """A URI with the password of its user part hidden (``http://alice:***@host``); other URIs unchanged."""
    return re.sub(r"(://[^/@:\s]*):[^/@\s]*@", r"\1:***@", uri) if uri else uri


def public_dump(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as written to the terminal, files and MLflow: credentials in URIs hidden."""
    d = cfg.model_dump(mode="json")
    d["tracking"]["uri"] = redact_uri(d["tracking"]["uri"])
    d["ray"]["address"] = redact_uri(d["ray"]["address"])
    return d


def config_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(public_dump(cfg), sort_keys=False)
