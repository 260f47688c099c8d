"""Stage outputs keyed by a hash of their inputs and config, so ``--resume`` reuses finished stages.

A stage folder is complete when its marker file exists (written last by whoever produced it). Without
``--resume`` an existing folder is cleared and the stage runs again. ``stage_key`` is the one place that
says what a key is made of: a job's spec, minus the fields that do not change its result, with its paths
replaced by fingerprints of what they hold (data files, a method's file parameters such as WHP's anchors,
a suite's file options; the DeepSpeed JSON is read into the spec, so its content is in the key).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

HASH_LEN = 12
# Spec fields that change where or how often a job writes, or how fast it runs, not what it computes.
NOT_IN_KEY = frozenset(
    {
        "name",
        "output_dir",
        "report_interval_s",
        "checkpoint_every",
        "threads_per_worker",
        "max_shard_size",
        "max_memory",
        "offload_folder",
    }
)


def digest(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:HASH_LEN]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:HASH_LEN]


def path_fingerprint(path: str | Path) -> str:
    """What a file or folder a stage reads holds: a file's content digest; a folder's files' names and
    content digests (for small folders such as task YAMLs; a model folder uses ``model_fingerprint``)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        return digest([(f.relative_to(p).as_posix(), file_digest(f)) for f in sorted(p.rglob("*")) if f.is_file()])
    return f"missing:{path}"


def model_fingerprint(path: str) -> str:
    """A local model folder: names, sizes and mtimes of its files (cheap for a 7B model); else the name."""
    p = Path(path)
    if not p.is_dir():
        return f"hub:{path}"
    files = sorted(
        (f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()
    )
    return digest(str(p.resolve()), files)


def claim(folder: Path, marker: str, resume: bool, keep_unfinished: bool = False) -> bool:
    """True when the stage in ``folder`` is already complete and may be reused; otherwise make the folder
    ready for a run: emptied, or with ``resume`` and ``keep_unfinished`` left as the unfinished run left it
    (its finished parts, such as a method's pre-job, are reused: the folder's name is its inputs' key)."""
    if resume and (folder / marker).exists():
        return True
    if folder.exists() and not (resume and keep_unfinished):
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return False


def stage_key(spec: BaseModel, *extra: Any, **fingerprints: Any) -> str:
    """The cache key of the stage run by ``spec``: its fields minus ``NOT_IN_KEY``, each field named in
    ``fingerprints`` (a path: ``model_path``, ``forget_path``, ``splits``, ...) replaced by the given
    fingerprint of its content, and any ``extra`` inputs the spec does not hold."""
    fields = spec.model_dump(mode="json", exclude=set(NOT_IN_KEY))
    unknown = set(fingerprints) - set(fields)
    if unknown:
        raise KeyError(f"stage_key: {type(spec).__name__} has no field(s) {sorted(unknown)}")
    return digest(type(spec).__name__, {**fields, **fingerprints}, *extra)


def method_params_key(cfg: Any) -> dict[str, Any]:
    """The method's params with each file parameter (``Method.path_params``) replaced by its content's
    fingerprint: editing WHP's anchors file changes the key, moving it does not."""
    from jobs.unlearn.methods import get_method

    files = get_method(cfg.unlearn.method).path_params
    return {k: path_fingerprint(v) if k in files and isinstance(v, str) else v for k, v in cfg.unlearn.params.items()}


def suite_options_key(spec: Any) -> dict[str, Any]:
    """The spec's suite options with each file option (``Suite.path_options``) replaced by its content's
    fingerprint (lmeval's task folder)."""
    from jobs.evaluate.suites import get_suite

    out = {}
    for name, opts in spec.suite_options.items():
        files = get_suite(name).path_options
        out[name] = {k: path_fingerprint(v) if k in files and isinstance(v, str) else v for k, v in opts.items()}
    return out
