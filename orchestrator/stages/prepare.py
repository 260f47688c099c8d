"""Stage 1, prepare: load every data source in canonical form, split the forget set by the attribute,
write the parts as jsonl files keyed by their content."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.data.cluster import cluster_rows
from jobs.data.io import write_jsonl
from jobs.data.loading import canonical_rows, canonical_text, is_text_record, load_rows
from jobs.data.rows import duplicate_questions
from jobs.data.sources import MC_SOURCE, SOURCE_NAMES
from jobs.data.split import split_rows
from orchestrator.config.data import DataSource
from orchestrator.config.schema import PipelineConfig
from orchestrator.run.cache import digest, file_digest
from orchestrator.run.context import Job, JobKind, Prepared, RunContext


@dataclass
class Loaded:
    data: dict[str, list[dict]]  # source -> canonical rows
    subsets: dict[str, list[dict]]  # subset value -> its forget rows
    notes: list[str]  # what is worth a warning: duplicate questions, rows left out of the split
    clusters: dict[str, dict] = field(default_factory=dict)  # split.by cluster: subset -> size, top_terms

    def counts(self) -> dict[str, int]:
        return {
            **{n: len(r) for n, r in self.data.items()},
            **{Job.key_of(JobKind.SUBSET, k): len(r) for k, r in self.subsets.items()},
        }


def load_data(cfg: PipelineConfig) -> Loaded:
    """Every data source in canonical form with every row checked (``jobs.data.rows``), and the forget set
    split into subsets; a ``DataError`` of one line for the first problem."""
    from jobs.data.rows import check_mc_rows

    cols = cfg.data.columns.model_dump()
    data: dict[str, list[dict]] = {}
    notes: list[str] = []
    for name in (n for n in SOURCE_NAMES if n != MC_SOURCE):  # mc rows are checked apart
        src = getattr(cfg.data, name)
        if src is None:
            continue
        rows = load_source(src)
        label = f"data.{name} ({src.label()})"
        data[name] = canonical_text(rows, cols, label) if name == "general" else canonical_rows(rows, cols, label)
        notes += _duplicates(data[name], label)
    for name, src in cfg.data.eval_sets.items():  # scored, never trained on
        label = f"data.eval_sets.{name} ({src.label()})"
        key = eval_set_key(name)
        data[key] = eval_set_rows(load_source(src), cols, label)
        notes += _duplicates(data[key], label)
    if cfg.data.mc is not None:  # multiple-choice rows are kept whole: their other columns are attributes
        src = cfg.data.mc
        data["mc"] = check_mc_rows(load_source(src), f"data.mc ({src.label()})")
    forget_kind = formats(data)["forget"]
    if "retain" in data:
        key = "question" if forget_kind == "qa" else "text"
        both = {r[key].strip() for r in data["forget"]} & {r.get(key, "").strip() for r in data["retain"]}
        if both:
            what = "question(s)" if key == "question" else "text(s)"
            notes.append(
                f"{len(both)} {what} are in both data.forget and data.retain (the method is asked to "
                f"forget and keep them), e.g. {sorted(both)[0]!r}"
            )
    if forget_kind == "text":
        _check_text_forget(cfg)
    s, label = cfg.split, f"data.forget ({cfg.data.forget.label()})"
    if s.by == "cluster":
        subsets, clusters = cluster_rows(
            data["forget"],
            s.clusters,
            s.seed,
            label,
            embedding=s.embedding,
            embedding_model=s.embedding_model or cfg.model.path,
        )
        return Loaded(data, subsets, notes, clusters)
    return Loaded(data, split_rows(data["forget"], s.attribute, s.groups, s.missing, label, notes), notes)


def load_source(src: DataSource) -> list[dict]:
    """The rows of a source, or of its parts in order; each part's ``set`` columns added to its rows."""
    if src.parts is None:
        rows = load_rows(src.path, src.format, src.name, src.split)
    else:
        rows = [r for part in src.parts for r in load_source(part)]
    return [{**r, **src.set} for r in rows] if src.set else rows


def formats(data: dict[str, list[dict]]) -> dict[str, str]:
    """Each loaded source's row kind: ``text`` (raw text) or ``qa``."""
    return {n: "text" if rows and is_text_record(rows[0]) else "qa" for n, rows in data.items()}


def _check_text_forget(cfg: PipelineConfig) -> None:
    from jobs.data import DataError
    from jobs.unlearn.methods import get_method

    if not get_method(cfg.unlearn.method).takes_text:
        raise DataError(
            f"data.forget ({cfg.data.forget.label()}): the rows are raw text, and unlearn.method "
            f"{cfg.unlearn.method!r} needs question/answer rows (it builds views of the answers)"
        )


def eval_set_rows(rows: list[dict], columns: dict, label: str) -> list[dict]:
    """An eval set's rows: question/answer or text rows in canonical form; rows of another kind (MUSE's
    verbmem prompts) as they are, for the suite that reads them."""
    have = set().union(*(r.keys() for r in rows)) if rows else set()
    if columns.get("question", "question") in have or columns.get("text", "text") in have:
        return canonical_rows(rows, columns, label)
    return rows


def eval_set_key(name: str) -> str:
    """The prepared file of ``data.eval_sets.<name>`` (apart from a training source of the same name)."""
    return f"eval_sets.{name}"


def _duplicates(rows: list[dict], label: str) -> list[str]:
    dups = duplicate_questions(rows) if rows and "question" in rows[0] else {}
    if not dups:
        return []
    q, at = next(iter(dups.items()))
    return [f"{label}: {len(dups)} question(s) asked more than once, e.g. rows {', '.join(map(str, at))}: {q!r}"]


def prepare_check(cfg: PipelineConfig) -> Loaded:
    """What ``spunge validate`` checks of the data: it loads, every row has what it needs, it splits."""
    return load_data(cfg)


def prepare(ctx: RunContext) -> None:
    """``ctx.prep``: the canonical files under ``stages/prepare-<hash>/`` and their sizes and digests."""
    cfg = ctx.cfg
    ctx.display.log(f"prepare: loading data, splitting forget set {cfg.split.describe()}")
    loaded = load_data(cfg)
    data, subsets = loaded.data, loaded.subsets
    for note in loaded.notes:
        ctx.display.log(f"warning: {note}")
    for name, c in loaded.clusters.items():
        ctx.display.log(f"prepare: cluster {name}: {c['size']} rows, top terms: {', '.join(c['top_terms'])}")
    folder = ctx.out / "stages" / f"prepare-{digest(data, cfg.split.model_dump())}"
    files = {}
    for name, rows in data.items():
        files[name] = str(folder / f"{name}.jsonl")
        write_jsonl(files[name], rows)
    subset_files = {}
    for key, rows in subsets.items():
        subset_files[key] = str(folder / "subsets" / f"{key}.jsonl")
        write_jsonl(subset_files[key], rows)
    ctx.prep = Prepared(
        files,
        subset_files,
        loaded.counts(),
        {n: file_digest(p) for n, p in {**files, **subset_files}.items()},
        loaded.clusters,
        formats(data),
    )
    ctx.display.log("prepare: " + ", ".join(f"{k}={v}" for k, v in ctx.prep.counts.items()))
