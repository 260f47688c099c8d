"""Pipeline YAML files: one pipeline, a file of ``variants:``, or a pipeline with a ``tune:`` section.

Every loader returns validated configs (``orchestrator.config.parse.parse_config``: the schema and the
cross-field checks) or raises ``ConfigError`` with one line per problem naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from orchestrator.config.parse import parse_config
from orchestrator.config.schema import ConfigError, PipelineConfig, StorageConfig, apply_overrides
from orchestrator.config.tune import TuneJob, parse_tune


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(["no such file (expected a pipeline YAML)"], str(path))
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {str(e).splitlines()[0]}"], str(path)) from None


def load_seeds(path: str | Path) -> Optional[list[int]]:
    """The file's top-level ``seeds: [0, 1, 2]`` (``spunge run`` repeats every pipeline over them), or None."""
    raw = _read_yaml(path)
    seeds = raw.get("seeds") if isinstance(raw, dict) else None
    if seeds is None:
        return None
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError([f"seeds: expected a list of distinct integers like [0, 1, 2], got {seeds!r}"], str(path))
    return seeds


def load_config(path: str | Path, overrides: Optional[dict] = None) -> PipelineConfig:
    """One pipeline config (a file with ``variants:`` is loaded with ``load_configs``)."""
    raw = _read_yaml(path)
    if isinstance(raw, dict):
        raw.pop("seeds", None)  # load_seeds: the runs' axis, not a field of the pipeline
    if isinstance(raw, dict) and "variants" in raw:
        raise ConfigError(["variants: this file describes several pipelines; use load_configs"], str(path))
    # a ``tune:`` section is for ``spunge tune`` (orchestrator/experiments/tune/): checked here, ignored by a plain run
    tune_raw = raw.pop("tune", None) if isinstance(raw, dict) else None
    if overrides:
        raw = apply_overrides(raw, overrides)
    cfg = parse_config(raw, Path(path).parent.resolve(), str(path))
    if tune_raw is not None:
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
    raw.pop("seeds", None)
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
        vraw = apply_overrides(
            raw,
            {**changes, "name": f"{raw.get('name', 'spunge')}/{name}", "storage.output_dir": str(base_out / str(name))},
        )
        try:
            out.append((str(name), parse_config(vraw, Path(path).parent.resolve(), str(path))))
        except ConfigError as e:
            problems += [f"variants.{name}.{p}" for p in e.problems]
    if problems:
        raise ConfigError(problems, str(path))
    return out


def load_tune(path: str | Path, output_dir: Optional[str] = None) -> TuneJob:
    """The base pipeline and its ``tune:`` section from one YAML; ``ConfigError`` on any problem."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or "tune" not in raw:
        raise ConfigError(
            ["tune: no tune section (space, objective, ...): nothing to search; see docs/tune.md"], str(path)
        )
    if "variants" in raw:
        raise ConfigError(["tune: a tune section cannot be combined with variants (tune one pipeline)"], str(path))
    if "seeds" in raw:
        raise ConfigError(
            ["seeds: spunge tune searches at one unlearn.seed; run the best config over seeds with spunge run --seeds"],
            str(path),
        )
    tune_raw = raw.pop("tune")
    if output_dir:
        raw = apply_overrides(raw, {"storage.output_dir": output_dir})
    cfg = parse_config(raw, Path(path).parent.resolve(), str(path))
    return TuneJob(cfg, parse_tune(tune_raw, cfg, str(path)), str(path))
