"""A raw config (a YAML mapping) made a validated ``PipelineConfig``: relative local paths resolved against the
config's folder (``resolve_paths``), the schema validated, then the cross-field checks of
``orchestrator.config.checks``; every problem one line naming the field (``ConfigError``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobs.data.sources import SOURCE_NAMES
from orchestrator.config.checks import check_config, field_path
from orchestrator.config.schema import ConfigError, PipelineConfig, UnlearnConfig

_PATH_FIELDS = (("model", "path"), ("eval", "oracle"), ("storage", "output_dir"), ("split", "embedding_model"))


def resolve_paths(raw: dict, base: Path) -> dict:
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
        sets = data.get("eval_sets") if isinstance(data.get("eval_sets"), dict) else {}
        for parent, name in [*((data, n) for n in SOURCE_NAMES), *((sets, n) for n in sets)]:
            src = parent.get(name)
            if isinstance(src, (str, list)):
                src = parent[name] = {"path": src}
            for leaf in _leaf_dicts(src):
                leaf["path"] = [fix(p) for p in leaf["path"]] if isinstance(leaf["path"], list) else fix(leaf["path"])
    if isinstance(raw.get("eval"), dict):
        _resolve_suite_paths(raw["eval"], fix)
    if isinstance(raw.get("deepspeed"), str):
        raw["deepspeed"] = fix(raw["deepspeed"])
    unlearn = raw.get("unlearn")
    if isinstance(unlearn, dict) and isinstance(unlearn.get("params"), dict):
        _resolve_method_paths(unlearn, fix)
    return raw


def _leaf_dicts(src: Any) -> list[dict]:
    """The raw source dicts with a path: ``src``, or its parts' (a part may be a bare path string)."""
    if not isinstance(src, dict):
        return []
    if isinstance(src.get("parts"), list):
        src["parts"] = [{"path": p} if isinstance(p, (str, list)) else p for p in src["parts"]]
        return [leaf for p in src["parts"] for leaf in _leaf_dicts(p)]
    return [src] if "path" in src else []


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


def _resolve_suite_paths(eval_raw: dict, fix: Any) -> None:
    """A suite's file options (``Suite.path_options``, e.g. lmeval's ``include_path``) resolve like data paths."""
    from jobs.evaluate.suites import SUITES

    for suite in SUITES.units():
        node = eval_raw.get(suite.name)
        for key in suite.path_options if isinstance(node, dict) else ():
            if isinstance(node.get(key), str):
                node[key] = fix(node[key])


def parse_config(raw: Any, base_dir: str | Path = ".", source: str = "config") -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a YAML mapping at the top level, got {type(raw).__name__}"], source)
    raw = resolve_paths(json.loads(json.dumps(raw)), Path(base_dir))
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([f"{field_path(err)}: {err['msg']}" for err in e.errors()], source) from None
    problems = check_config(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg
