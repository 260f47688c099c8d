"""Row-level checks of canonical records, run when data is loaded (``spunge validate`` and the prepare
stage), before any job: every problem is a ``DataError`` of one line naming the source (config field and
file), the row (1-based, the n-th record of the file: for csv the n-th row after the header), the column
and what was expected, with how many rows in all have that problem.

- question/answer rows (forget, retain, holdout): ``question`` and ``answer`` non-empty strings;
  ``paraphrased_answer``, where the source has that column, a non-empty string in every row;
  ``perturbed_answers``, where it has that column, a non-empty list of non-empty strings in every row (a
  string holding a JSON list, as csv stores lists, is parsed);
- text rows (general): ``text`` a non-empty string;
- multiple-choice rows (mc): ``question`` a non-empty string, ``choices`` a list of at least 2 non-empty
  strings, ``answer`` an int index into them.

A column the source does not have at all is not checked (truth ratios need the two answer columns; the
qa suite leaves them out without). ``duplicate_questions`` finds questions asked twice (reported, not
fatal).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional, Sequence

from jobs.data import DataError


def _got(v: Any) -> str:
    if v is None:
        return "null"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _text(v: Any) -> Optional[str]:
    """None when ``v`` is a non-empty string (after strip), else what was expected."""
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def _string_list(v: Any, at_least: int = 1) -> Optional[str]:
    ok = isinstance(v, (list, tuple)) and len(v) >= at_least and all(isinstance(x, str) and x.strip() for x in v)
    return (
        None
        if ok
        else (
            f"a list of at least {at_least} non-empty strings"
            if at_least > 1
            else "a non-empty list of non-empty strings"
        )
    )


def _answer_index(v: Any, row: dict) -> Optional[str]:
    n = len(row["choices"]) if isinstance(row.get("choices"), (list, tuple)) else 0
    ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n
    if not ok and type(v).__module__ == "numpy" and hasattr(v, "item"):
        ok = isinstance(v.item(), int) and 0 <= v.item() < n
    return None if ok else f"an int index into the row's {n} choices"


Check = Callable[[Any, dict], Optional[str]]


def check_rows(rows: Sequence[dict], label: str, checks: Sequence[tuple[str, str, Check]]) -> None:
    """Apply ``(canonical column, column as the user names it, check)`` to every row; raise a ``DataError``
    for the first row that fails, counting the rows that fail the same check."""
    for canon, shown, check in checks:
        bad = [(i, expected) for i, r in enumerate(rows, 1) if (expected := check(r.get(canon), r)) is not None]
        if bad:
            i, expected = bad[0]
            more = f" ({len(bad)} of {len(rows)} rows)" if len(bad) > 1 else ""
            raise DataError(
                f"{label} row {i}: column {shown!r}: expected {expected}, got {_got(rows[i - 1].get(canon))}{more}"
            )


def parse_list_text(rows: list[dict], column: str) -> None:
    """Lists stored as JSON text (csv) parsed in place; other strings are left for the check to name."""
    for r in rows:
        v = r.get(column)
        if isinstance(v, str) and v.strip().startswith("["):
            try:
                r[column] = json.loads(v)
            except json.JSONDecodeError:
                pass


def check_qa_rows(rows: list[dict], label: str, columns: Mapping[str, str]) -> list[dict]:
    """Question/answer rows (canonical names) checked; ``columns`` maps canonical -> the user's names."""
    if not rows:
        return rows
    name = lambda c: columns.get(c, c)  # noqa: E731
    checks: list[tuple[str, str, Check]] = [
        ("question", name("question"), lambda v, r: _text(v)),
        ("answer", name("answer"), lambda v, r: _text(v)),
    ]
    has = set().union(*(r.keys() for r in rows))
    if "paraphrased_answer" in has:
        checks.append(("paraphrased_answer", name("paraphrased_answer"), lambda v, r: _text(v)))
    if "perturbed_answers" in has:
        parse_list_text(rows, "perturbed_answers")
        checks.append(("perturbed_answers", name("perturbed_answers"), lambda v, r: _string_list(v)))
    check_rows(rows, label, checks)
    return rows


def check_text_rows(rows: list[dict], label: str, column: str = "text") -> list[dict]:
    check_rows(rows, label, [("text", column, lambda v, r: _text(v))])
    return rows


def check_mc_rows(rows: Sequence[dict], label: str) -> list[dict]:
    rows = list(rows)
    for r in rows:
        if isinstance(r.get("choices"), str):
            parse_list_text([r], "choices")
    check_rows(
        rows,
        label,
        [
            ("question", "question", lambda v, r: _text(v)),
            ("choices", "choices", lambda v, r: _string_list(v, 2)),
            ("answer", "answer", _answer_index),
        ],
    )
    return rows


def duplicate_questions(rows: Sequence[dict]) -> dict[str, list[int]]:
    """Questions that occur more than once (after strip): question -> its 1-based rows."""
    seen: dict[str, list[int]] = {}
    for i, r in enumerate(rows, 1):
        if isinstance(r.get("question"), str):
            seen.setdefault(r["question"].strip(), []).append(i)
    return {q: idx for q, idx in seen.items() if len(idx) > 1}
