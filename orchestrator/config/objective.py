"""The objective of a search: a metric (or weighted sum) of the tuned model, with constraints relative to
the base model; and which trial is best."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from orchestrator.config.data import Section


class Constraint(Section):
    """A bound on one metric of the tuned model, absolute or relative to the base model's value."""

    metric: str
    min_ratio_to_base: Optional[float] = Field(None, description="metric >= ratio x base model's metric")
    max_ratio_to_base: Optional[float] = Field(None, description="metric <= ratio x base model's metric")
    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _one_bound(self):
        if all(getattr(self, k) is None for k in ("min_ratio_to_base", "max_ratio_to_base", "min", "max")):
            raise ValueError("give at least one of min_ratio_to_base, max_ratio_to_base, min, max")
        return self


class Objective(Section):
    """``metric`` (one metric) or ``weights`` (a weighted sum of metrics) of ``model``'s eval metrics.

    A trial that breaks a constraint scores ``value - penalty x shortfall`` (``+`` when minimising), the
    shortfall being the sum over broken bounds of ``|bound - actual| / |bound|``; the best trial is the best
    feasible one (an infeasible trial wins only when none is feasible)."""

    metric: Optional[str] = None
    weights: Optional[dict[str, float]] = None
    mode: Literal["max", "min"] = "max"
    model: Literal["merged", "unsplit"] = Field("merged", description="which model of a trial is scored")
    constraints: list[Constraint] = Field(default_factory=list)
    penalty: float = Field(1000.0, ge=0)

    @model_validator(mode="after")
    def _metric_or_weights(self):
        if (self.metric is None) == (self.weights is None):
            raise ValueError("give exactly one of metric (a single metric) or weights ({metric: weight})")
        if self.weights is not None and not self.weights:
            raise ValueError("weights: name at least one metric")
        return self

    def metrics(self) -> list[str]:
        names = [self.metric] if self.metric else list(self.weights or {})
        return list(dict.fromkeys(names + [c.metric for c in self.constraints]))

    def describe(self) -> str:
        what = self.metric if self.metric else " + ".join(f"{w:g}*{k}" for k, w in (self.weights or {}).items())
        cons = [
            f"{c.metric} {op} {v:g}{' x base' if 'ratio' in k else ''}"
            for c in self.constraints
            for k, op in (("min_ratio_to_base", ">="), ("max_ratio_to_base", "<="), ("min", ">="), ("max", "<="))
            if (v := getattr(c, k)) is not None
        ]
        return f"{self.mode} {what} of {self.model}" + (f" s.t. {', '.join(cons)}" if cons else "")


class ObjectiveError(RuntimeError):
    pass


def objective_value(obj: Objective, metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """``objective`` (what the search optimises), ``objective_raw`` (before penalties), ``feasible`` (1/0)
    and ``constraint_shortfall`` for one model's ``metrics``; ``base`` holds the base model's metrics."""

    def get(m: dict[str, float], name: str, whose: str) -> float:
        if name not in m or m[name] is None:
            raise ObjectiveError(
                f"objective: metric {name!r} is not among the {whose} model's metrics "
                f"({', '.join(sorted(m))}); check eval.suites"
            )
        return float(m[name])

    if obj.metric:
        raw = get(metrics, obj.metric, obj.model)
    else:
        raw = sum(w * get(metrics, k, obj.model) for k, w in (obj.weights or {}).items())
    shortfall = 0.0
    for c in obj.constraints:
        actual = get(metrics, c.metric, obj.model)
        bounds = []
        if c.min_ratio_to_base is not None:
            bounds.append((c.min_ratio_to_base * get(base, c.metric, "base"), 1))
        if c.max_ratio_to_base is not None:
            bounds.append((c.max_ratio_to_base * get(base, c.metric, "base"), -1))
        if c.min is not None:
            bounds.append((c.min, 1))
        if c.max is not None:
            bounds.append((c.max, -1))
        for bound, sign in bounds:  # sign 1: actual >= bound; -1: actual <= bound
            gap = sign * (bound - actual)
            if gap > 0:
                shortfall += gap / max(abs(bound), 1e-12)
    penalised = raw - obj.penalty * shortfall if obj.mode == "max" else raw + obj.penalty * shortfall
    return {
        "objective": penalised,
        "objective_raw": raw,
        "feasible": float(shortfall == 0.0),
        "constraint_shortfall": shortfall,
    }


def rank(row: dict[str, Any], mode: str) -> tuple[float, float]:
    """How scored rows (trials, evaluated steps) compare, larger is better: feasible before infeasible, then the
    ``objective`` in ``mode``."""
    return (row.get("feasible", 0.0), (1.0 if mode == "max" else -1.0) * row["objective"])


def best_trial(rows: list[dict[str, Any]], mode: str) -> Optional[dict[str, Any]]:
    """The best row by ``rank``; rows without an objective never win."""
    scored = [r for r in rows if isinstance(r.get("objective"), (int, float)) and math.isfinite(r["objective"])]
    if not scored:
        return None
    return max(scored, key=lambda r: rank(r, mode))
