"""Loading user data and bringing it to the canonical record form.

A source is a local file (json, jsonl, parquet, csv), a list of files, or a hub dataset name. Local JSON is
read as written (every value keeps its type, so a bad row is named, not coerced); parquet, csv and hub
datasets go through Hugging Face ``datasets``. Columns are renamed to the canonical
``question``/``answer``/``paraphrased_answer``/``perturbed_answers`` (QA data) or
``text`` (general data, and raw-text forget/retain/holdout corpora such as MUSE's); every other column (the
attributes) is kept as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from jobs.data import DataError
from jobs.data.rows import check_qa_rows, check_text_rows

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
QA_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answers")


def _builder(paths: Sequence[str], fmt: str) -> str:
    if fmt not in ("auto", "hub"):
        return "json" if fmt == "jsonl" else fmt
    kinds = {BUILDERS.get(Path(p).suffix.lower()) for p in paths}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{', '.join(paths)}: cannot tell the format from the suffix; set format: json|parquet|csv")
    return kinds.pop()


def read_json_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Records of local JSON files, each a JSON array of objects or JSON lines (blank lines skipped), with
    the types as written (``datasets`` would coerce a column to one type, or refuse mixed ones)."""
    rows: list[dict[str, Any]] = []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8")
        try:
            if text.lstrip().startswith("["):
                items = json.loads(text)
            else:
                items = []
                for n, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            items.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{p} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        for i, item in enumerate(items, len(rows) + 1):
            if not isinstance(item, dict):
                raise DataError(f"{p} row {i}: expected a JSON object (a record), got {type(item).__name__}")
        rows += items
    return rows


def load_rows(
    path: Union[str, Sequence[str]], fmt: str = "auto", name: Optional[str] = None, split: str = "train"
) -> list[dict[str, Any]]:
    """Rows of a dataset as plain dicts: local JSON read as written; parquet, csv and hub datasets through
    ``datasets``."""
    paths = [path] if isinstance(path, str) else list(path)
    local = fmt != "hub" and all(Path(p).exists() for p in paths)
    if local and _builder(paths, fmt) == "json":
        return read_json_rows(paths)
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()
    try:
        if local:
            ds = load_dataset(_builder(paths, fmt), data_files=paths, split="train")
        else:
            if len(paths) != 1:
                raise DataError(f"{paths}: a hub dataset is one name")
            ds = load_dataset(paths[0], name, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; name the source and keep one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{', '.join(paths)}: could not load ({first})") from None
    return [dict(r) for r in ds]


def canonical_qa(
    rows: list[dict], columns: Mapping[str, str], source: str, require: Sequence[str] = ("question", "answer")
) -> list[dict]:
    """Rename the configured columns to the canonical names and check every row (``jobs.data.rows``); fail
    naming the missing column, or the first bad row."""
    if not rows:
        return rows
    have = set().union(*(r.keys() for r in rows))
    for canon in require:
        col = columns.get(canon, canon)
        if col not in have:
            raise DataError(f"{source}: no column {col!r} (data.columns.{canon}); columns are {sorted(have)}")
    out = []
    for r in rows:
        r = dict(r)
        for canon in QA_FIELDS:
            col = columns.get(canon, canon)
            if col != canon and col in r:
                r[canon] = r.pop(col)
        out.append(r)
    return check_qa_rows(out, source, columns)


def canonical_text(rows: list[dict], columns: Mapping[str, str], source: str) -> list[dict]:
    """Text rows: the configured text column renamed to ``text`` and checked; the other columns (attributes
    to split by) kept."""
    col = columns.get("text", "text")
    if rows and col not in set().union(*(r.keys() for r in rows)):
        raise DataError(f"{source}: no column {col!r} (data.columns.text); columns are {sorted(rows[0])}")
    out = [{**{k: v for k, v in r.items() if k != col}, "text": r.get(col)} for r in rows]
    return check_text_rows(out, source, col)


def is_text_record(record: Mapping[str, Any]) -> bool:
    """A canonical raw-text record: a string ``text`` and no ``question``."""
    return isinstance(record.get("text"), str) and "question" not in record


def is_text(rows: list[dict], columns: Mapping[str, str]) -> bool:
    """Raw text rows (MUSE's corpora, WMDP's forget corpora): a text column and no question column."""
    have = set().union(*(r.keys() for r in rows)) if rows else set()
    return columns.get("text", "text") in have and columns.get("question", "question") not in have


def canonical_rows(rows: list[dict], columns: Mapping[str, str], source: str) -> list[dict]:
    """Question/answer rows, or text rows when they are text (``is_text``)."""
    return canonical_text(rows, columns, source) if is_text(rows, columns) else canonical_qa(rows, columns, source)
