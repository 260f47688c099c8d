"""The ``space`` section: dotted config path -> one sampler, checked here and turned into Tune's
``param_space``."""

from __future__ import annotations

from typing import Any, Optional

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")


def check_dist(dist: Any) -> Optional[str]:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SAMPLERS:
        return f"expected one of {{{' | '.join(f'{s}: ...' for s in SAMPLERS)}}}, got {dist!r}"
    kind, arg = next(iter(dist.items()))
    if kind in ("choice", "grid"):
        return None if isinstance(arg, list) and arg else f"{kind}: expected a non-empty list of values"
    if not (
        isinstance(arg, list)
        and len(arg) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in arg)
    ):
        return f"{kind}: expected [low, high]"
    lo, hi = arg
    if not lo < hi:
        return f"{kind}: expected low < high, got [{lo}, {hi}]"
    if kind == "loguniform" and lo <= 0:
        return "loguniform: expected low > 0"
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        return "randint: expected integers [low, high) (high excluded, as ray.tune.randint)"
    return None


def candidates(dist: dict[str, Any]) -> list[Any]:
    """Values that stand for a distribution when checking that the path takes them."""
    kind, arg = next(iter(dist.items()))
    if kind in ("choice", "grid"):
        return list(arg)
    return [arg[0], arg[1] - 1] if kind == "randint" else list(arg)


def plain(v: Any) -> Any:
    """A Python scalar for a sampled value (Tune's samplers return numpy scalars)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tune's ``param_space`` for the ``space`` section (keys stay dotted config paths)."""
    from ray import tune

    make = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {path: make[kind](arg) for path, dist in space.items() for kind, arg in dist.items()}
