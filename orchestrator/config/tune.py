"""The ``tune:`` section: its schema, and its checks against the pipeline it tunes (every searched path is
a config field that takes each of its values)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from jobs.extras import missing
from orchestrator.config.objective import Objective, Section
from orchestrator.config.parse import parse_config
from orchestrator.config.schema import ConfigError, PipelineConfig, apply_overrides
from orchestrator.config.space import candidates, check_dist

# Sections a trial may not change: the reference models (base, oracle) are evaluated once for all trials on
# this data and these suites, and a trial's name, output folder, tracking and Ray are set by the tuner.
FIXED = ("model", "data", "eval", "tracking", "storage", "ray", "name")


class SchedulerConfig(Section):
    """``fifo`` runs every trial to the end; ``asha`` (``ray.tune.schedulers.ASHAScheduler``) stops trials
    whose unlearning ``metric`` is worse than their peers' at the same number of unlearning steps."""

    name: Literal["fifo", "asha"] = "fifo"
    metric: Literal["loss", "forget_loss", "retain_loss"] = Field(
        "loss", description="ASHA: the reported unlearning metric"
    )
    mode: Literal["min", "max"] = "min"
    max_t: Optional[int] = Field(
        None, gt=0, description="ASHA: unlearning steps of a whole trial (default: from max_steps)"
    )
    grace_period: Optional[int] = Field(
        None, gt=0, description="ASHA: steps before a trial can be stopped (default max_t/4)"
    )
    reduction_factor: float = Field(2.0, gt=1)


class TuneSection(Section):
    space: dict[str, dict[str, Any]] = Field(
        description="dotted.config.path -> {choice|grid|uniform|loguniform|randint: ...}"
    )
    objective: Objective
    num_samples: int = Field(4, gt=0, description="trials (times each grid point)")
    search: Literal["random", "optuna"] = "random"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent_trials: Optional[int] = Field(None, gt=0, description="default: as many as the CPUs/GPUs fit")
    seed: Optional[int] = Field(0, description="seed of the search algorithm")

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("name at least one dotted.config.path to search")
        problems = []
        for path, dist in v.items():
            if err := check_dist(dist):
                problems.append(f"{path}: {err}")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _grid_random_only(self):
        if self.search == "optuna" and any("grid" in d for d in self.space.values()):
            raise ValueError("space: grid works with search: random only (use choice with optuna)")
        return self


@dataclass
class TuneJob:
    cfg: PipelineConfig  # the base pipeline (the tune section removed, paths resolved)
    tune: TuneSection
    source: str


def parse_tune(raw_tune: Any, cfg: PipelineConfig, source: str = "config") -> TuneSection:
    """Validate a ``tune:`` section against the pipeline ``cfg``: every searched path must be a config field
    and take each of its values (checked with the whole pipeline validation). Raises ``ConfigError``."""
    if not isinstance(raw_tune, dict):
        raise ConfigError(
            [f"tune: expected a mapping (space, objective, num_samples, ...), got {type(raw_tune).__name__}"], source
        )
    try:
        spec = TuneSection.model_validate(raw_tune)
    except ValidationError as e:
        raise ConfigError(
            [
                f"tune.{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                for err in e.errors()
            ],
            source,
        ) from None
    base = cfg.model_dump(mode="json")
    problems = []
    if spec.search == "optuna" and (err := missing("optuna", "tune.search: optuna")):
        problems.append(err)
    for path, dist in spec.space.items():
        if path.split(".")[0] in FIXED:
            problems.append(
                f"tune.space.{path}: cannot be searched (fixed for all trials: {', '.join(FIXED)}); "
                "search unlearn, split, merge, scaling or deepspeed fields"
            )
            continue
        for value in candidates(dist):
            err = _check_value(base, path, value)
            if err:
                problems.append(f"tune.space.{path}: {err}")
                break
    if problems:
        raise ConfigError(problems, source)
    return spec


def _check_value(base: dict, path: str, value: Any) -> Optional[str]:
    node = base
    for key in path.split(".")[:-1]:
        node = node.get(key, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return f"no such config field ({key!r} holds no fields)"
    try:
        parse_config(apply_overrides(base, {path: value}))
    except ConfigError as e:
        for p in e.problems:
            if p.startswith(f"{path}: Extra inputs are not permitted"):
                return (
                    "no such config field (expected a dotted path into the pipeline config, e.g. unlearn.optimizer.lr)"
                )
        return f"value {value!r}: {e.problems[0]}"
    return None
