"""Stage 1, prepare: load every data source in canonical form, split the forget set by the attribute,
write the parts as jsonl files keyed by their content."""

from __future__ import annotations

from jobs.data.io import write_jsonl
from jobs.data.loading import canonical_qa, canonical_text, load_rows
from jobs.data.split import split_rows
from orchestrator.cache import digest, file_digest
from orchestrator.config import PipelineConfig
from orchestrator.context import Job, JobKind, Prepared, RunContext

SOURCES = ("forget", "retain", "holdout", "general")  # question/answer sources, and general text


def load_data(cfg: PipelineConfig) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Every data source in canonical form, and the forget set split into subsets."""
    cols = cfg.data.columns.model_dump()
    data: dict[str, list[dict]] = {}
    for name in SOURCES:
        src = getattr(cfg.data, name)
        if src is None:
            continue
        rows = load_rows(src.path, src.format, src.name, src.split)
        label = f"data.{name} ({src.path})"
        data[name] = canonical_text(rows, cols, label) if name == "general" else canonical_qa(rows, cols, label)
    if cfg.data.mc is not None:  # multiple-choice rows are kept whole: their other columns are attributes
        from jobs.evaluate.mc import check_mc_records

        src = cfg.data.mc
        data["mc"] = check_mc_records(load_rows(src.path, src.format, src.name, src.split), f"data.mc ({src.path})")
    return data, split_rows(data["forget"], cfg.split.attribute, cfg.split.groups)


def prepare_check(cfg: PipelineConfig) -> dict[str, int]:
    """What ``spunge validate`` checks of the data: it loads, has the columns, and splits; the sizes."""
    return _counts(*load_data(cfg))


def _counts(data: dict[str, list], subsets: dict[str, list]) -> dict[str, int]:
    return {**{n: len(r) for n, r in data.items()}, **{Job.key_of(JobKind.SUBSET, k): len(r) for k, r in subsets.items()}}


def prepare(ctx: RunContext) -> None:
    """``ctx.prep``: the canonical files under ``stages/prepare-<hash>/`` and their sizes and digests."""
    cfg = ctx.cfg
    ctx.display.log(f"prepare: loading data, splitting forget set by {cfg.split.attribute!r}")
    data, subsets = load_data(cfg)
    folder = ctx.out / "stages" / f"prepare-{digest(data, cfg.split.model_dump())}"
    files = {}
    for name, rows in data.items():
        files[name] = str(folder / f"{name}.jsonl")
        write_jsonl(files[name], rows)
    subset_files = {}
    for key, rows in subsets.items():
        subset_files[key] = str(folder / "subsets" / f"{key}.jsonl")
        write_jsonl(subset_files[key], rows)
    ctx.prep = Prepared(files, subset_files, _counts(data, subsets),
                        {n: file_digest(p) for n, p in {**files, **subset_files}.items()})
    ctx.display.log("prepare: " + ", ".join(f"{k}={v}" for k, v in ctx.prep.counts.items()))
