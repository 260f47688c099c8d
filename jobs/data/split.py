"""Splitting the forget set by an attribute: one subset per value, or explicit groups of values."""

from __future__ import annotations

import re
from typing import Any, Optional

from jobs.data import DataError


def subset_key(name: Any) -> str:
    """A name safe for folders and MLflow run names ('science fiction' -> 'science_fiction')."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_")
    return key or "empty"


MISSING_SUBSET = "missing"  # split.missing: group puts the rows without a value here


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def split_rows(
    rows: list[dict],
    attribute: str,
    groups: Optional[dict[str, list[Any]]] = None,
    missing: str = "error",
    label: str = "data.forget",
    notes: Optional[list[str]] = None,
) -> dict[str, list[dict]]:
    """Subsets of ``rows`` keyed by subset name, in a stable order.

    Without ``groups``: one subset per distinct value of ``attribute`` (sorted). With ``groups``: each
    group holds the rows whose value is one of its values. Rows without a value (null, empty) are an error
    (``missing="error"``), left out (``"drop"``) or a subset of their own named ``missing`` (``"group"``);
    what was done is appended to ``notes``. An unknown attribute, a value that does not occur, or a value in
    two groups is a ``DataError`` naming it.
    """
    if not rows:
        raise DataError(f"{label}: the forget set is empty")
    if all(attribute not in r for r in rows):
        cols = sorted(set().union(*(r.keys() for r in rows)))
        raise DataError(f"split.attribute: column {attribute!r} is not in the forget data; columns are {cols}")
    none = [i for i, r in enumerate(rows, 1) if _missing(r.get(attribute))]
    if none:
        count = f"{len(none)} of {len(rows)} forget rows have no {attribute!r} value"
        if missing == "error":
            raise DataError(
                f"{label} row {none[0]}: column {attribute!r} (split.attribute): expected a value, got "
                f"{rows[none[0] - 1].get(attribute)!r}; {count} (split.missing: drop or group to go on)"
            )
        if notes is not None:
            notes.append(
                f"split.missing: {missing}: {count}; "
                + ("they are left out" if missing == "drop" else f"they form the subset {MISSING_SUBSET!r}")
            )
    kept = [r for r in rows if not _missing(r.get(attribute))]
    present = sorted({str(r[attribute]) for r in kept})
    if groups is None:
        groups = {v: [v] for v in present}
    seen: dict[str, str] = {}
    subsets: dict[str, list[dict]] = {}
    for name, values in groups.items():
        wanted = {str(v) for v in values}
        for v in wanted:
            if v not in present:
                raise DataError(
                    f"split.groups.{name}: value {v!r} does not occur in column {attribute!r} (values: {present})"
                )
            if v in seen:
                raise DataError(f"split.groups.{name}: value {v!r} is already in group {seen[v]!r}")
            seen[v] = name
        key = subset_key(name)
        if key in subsets:
            raise DataError(f"split.groups: two groups map to the same name {key!r}")
        subsets[key] = [r for r in kept if str(r[attribute]) in wanted]
    if none and missing == "group":
        if MISSING_SUBSET in subsets:
            raise DataError(
                f"split.missing: group: the subset name {MISSING_SUBSET!r} is already a value of "
                f"{attribute!r}; use split.missing: drop, or fill in the values"
            )
        subsets[MISSING_SUBSET] = [r for r in rows if _missing(r.get(attribute))]
    if not subsets:
        raise DataError(f"{label}: no forget row has a {attribute!r} value: nothing to split")
    return subsets
