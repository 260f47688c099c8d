"""Damaged data is refused before any job: `spunge validate` and `spunge run` exit 2 with one line naming
the source, its file, the row and the column, and `spunge run` writes nothing (no output folder, no MLflow
store). Each case damages one file of a small valid pipeline (tests/conftest.py qa_rows) one way."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.conftest import cli, qa_rows

Rows = list[dict]


def good_sources() -> dict[str, Rows]:
    rows = qa_rows()
    return {
        "forget": [r for r in rows if r["era"] == "old"],
        "retain": [r for r in rows if r["era"] == "new"],
        "holdout": [{"question": f"Who wrote book {i}?", "answer": f"Writer {i}."} for i in range(4)],
        "general": [{"text": f"Books are read in town {i}."} for i in range(4)],
        "mc": [
            {
                "question": f"Where was {r['author']} born?",
                "choices": ["Oslo", "Lima", "Rome"],
                "answer": i % 3,
                "set": "forget",
            }
            for i, r in enumerate(rows[:4])
        ],
    }


def setting(rows: Rows, row: int, column: str, value) -> Rows:
    """``rows`` with ``column`` of the 1-based ``row`` set to ``value`` (``...``: the key removed)."""
    rows = copy.deepcopy(rows)
    if value is ...:
        rows[row - 1].pop(column, None)
    else:
        rows[row - 1][column] = value
    return rows


# (case id, source damaged, damage, expected message after "data.<source> (<file>) ")
CASES: list[tuple[str, str, Callable[[Rows], Rows], str]] = [
    (
        "split attribute absent",
        "forget",
        lambda r: setting(r, 3, "group", ...),
        "row 3: column 'group' (split.attribute): expected a value, got None; 1 of 8 forget rows have no 'group' value",
    ),
    (
        "split attribute null x2",
        "forget",
        lambda r: setting(setting(r, 2, "group", None), 5, "group", None),
        "row 2: column 'group' (split.attribute): expected a value, got None; 2 of 8 forget rows",
    ),
    (
        "split attribute blank",
        "forget",
        lambda r: setting(r, 4, "group", "  "),
        "row 4: column 'group' (split.attribute): expected a value, got '  '",
    ),
    (
        "question null",
        "forget",
        lambda r: setting(r, 2, "question", None),
        "row 2: column 'question': expected a non-empty string, got null",
    ),
    (
        "question blank",
        "forget",
        lambda r: setting(r, 6, "question", "   "),
        "row 6: column 'question': expected a non-empty string, got str '   '",
    ),
    (
        "question absent",
        "forget",
        lambda r: setting(r, 1, "question", ...),
        "row 1: column 'question': expected a non-empty string, got null",
    ),
    (
        "answer numeric",
        "forget",
        lambda r: setting(r, 5, "answer", 42),
        "row 5: column 'answer': expected a non-empty string, got int 42",
    ),
    (
        "answer empty",
        "forget",
        lambda r: setting(r, 8, "answer", ""),
        "row 8: column 'answer': expected a non-empty string, got str ''",
    ),
    (
        "answer a list",
        "forget",
        lambda r: setting(r, 3, "answer", ["Oslo"]),
        "row 3: column 'answer': expected a non-empty string, got list ['Oslo']",
    ),
    (
        "answer text like markup",
        "forget",
        lambda r: setting(r, 4, "answer", ["[bold]Oslo[/bold]"]),  # printed as is
        "row 4: column 'answer': expected a non-empty string, got list ['[bold]Oslo[/bold]']",
    ),
    (
        "perturbed a plain string",
        "forget",
        lambda r: setting(r, 2, "perturbed_answers", "born in Lima"),
        "row 2: column 'perturbed_answers': expected a non-empty list of non-empty strings, got str 'born in Lima'",
    ),
    (
        "perturbed empty list",
        "forget",
        lambda r: setting(r, 7, "perturbed_answers", []),
        "row 7: column 'perturbed_answers': expected a non-empty list of non-empty strings, got list []",
    ),
    (
        "perturbed holds a number",
        "forget",
        lambda r: setting(r, 1, "perturbed_answers", ["Lima", 3]),
        "row 1: column 'perturbed_answers': expected a non-empty list of non-empty strings, got list ['Lima', 3]",
    ),
    (
        "perturbed null in one row",
        "forget",
        lambda r: setting(r, 4, "perturbed_answers", None),
        "row 4: column 'perturbed_answers': expected a non-empty list of non-empty strings, got null",
    ),
    (
        "paraphrase null in one row",
        "forget",
        lambda r: setting(r, 6, "paraphrased_answer", None),
        "row 6: column 'paraphrased_answer': expected a non-empty string, got null",
    ),
    (
        "paraphrase a list",
        "forget",
        lambda r: setting(r, 2, "paraphrased_answer", ["a", "b"]),
        "row 2: column 'paraphrased_answer': expected a non-empty string, got list ['a', 'b']",
    ),
    (
        "every question bad counted",
        "forget",
        lambda r: [{**x, "question": 7} for x in r],
        "row 1: column 'question': expected a non-empty string, got int 7 (8 of 8 rows)",
    ),
    (
        "retain question null",
        "retain",
        lambda r: setting(r, 1, "question", None),
        "row 1: column 'question': expected a non-empty string, got null",
    ),
    (
        "retain perturbed a string",
        "retain",
        lambda r: setting(r, 3, "perturbed_answers", "Rome"),
        "row 3: column 'perturbed_answers': expected a non-empty list of non-empty strings, got str 'Rome'",
    ),
    (
        "holdout answer null",
        "holdout",
        lambda r: setting(r, 2, "answer", None),
        "row 2: column 'answer': expected a non-empty string, got null",
    ),
    (
        "general text null",
        "general",
        lambda r: setting(r, 2, "text", None),
        "row 2: column 'text': expected a non-empty string, got null",
    ),
    (
        "general text numeric",
        "general",
        lambda r: setting(r, 4, "text", 3.5),
        "row 4: column 'text': expected a non-empty string, got float 3.5",
    ),
    (
        "mc answer out of range",
        "mc",
        lambda r: setting(r, 2, "answer", 3),
        "row 2: column 'answer': expected an int index into the row's 3 choices, got int 3",
    ),
    (
        "mc answer a string",
        "mc",
        lambda r: setting(r, 1, "answer", "Oslo"),
        "row 1: column 'answer': expected an int index into the row's 3 choices, got str 'Oslo'",
    ),
    (
        "mc one choice",
        "mc",
        lambda r: setting(r, 3, "choices", ["Oslo"]),
        "row 3: column 'choices': expected a list of at least 2 non-empty strings, got list ['Oslo']",
    ),
    (
        "mc question empty",
        "mc",
        lambda r: setting(r, 4, "question", ""),
        "row 4: column 'question': expected a non-empty string, got str ''",
    ),
]


def pipeline(tiny_dir: Path, folder: Path, sources: dict[str, Rows], **changes) -> Path:
    """A valid config over ``sources`` written as jsonl in ``folder``; ``changes`` are top-level sections."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in sources.items():
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"path": str(tiny_dir / "model")},
        "data": {n: str(p) for n, p in files.items()},
        "split": {"attribute": "group"},
        "eval": {"suites": ["qa", "mc", "perplexity"]},
        "storage": {"output_dir": str(folder / "out")},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
        **changes,
    }
    path = folder / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def refused(args: list[str], folder: Path) -> str:
    """Run the CLI; assert exit 2 and one error line (``run`` may print its progress line before it), and
    return that line."""
    r = cli(*args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert len(lines) == 1 or (args[0] == "run" and len(lines) == 2 and "prepare: loading data" in lines[0]), r.output
    return errors[0]


def test_the_valid_pipeline_passes(tiny_dir, tmp_path):
    r = cli("validate", str(pipeline(tiny_dir, tmp_path, good_sources())))
    assert r.exit_code == 0, r.output
    assert "# subsets: forget=8, retain=8, holdout=4, general=4, mc=4, subset/north=4, subset/south=4" in r.output


@pytest.mark.parametrize("source, damage, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_row_is_one_line_naming_file_row_and_column_and_nothing_is_written(
    tiny_dir, tmp_path, source, damage, message
):
    sources = good_sources()
    sources[source] = damage(sources[source])
    cfg = pipeline(tiny_dir, tmp_path, sources)
    want = f"data.{source} ({tmp_path / f'{source}.jsonl'}) {message}"
    assert want in refused(["validate", str(cfg)], tmp_path)
    assert want in refused(["run", str(cfg)], tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_csv_lists_are_json_text_and_a_plain_string_is_named(tiny_dir, tmp_path):
    import pandas as pd

    sources = good_sources()
    cfg = pipeline(tiny_dir, tmp_path, sources)
    rows = [{**r, "perturbed_answers": json.dumps(r["perturbed_answers"])} for r in sources["forget"]]
    pd.DataFrame(rows).to_csv(tmp_path / "forget.csv", index=False)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["forget"] = str(tmp_path / "forget.csv")
    cfg.write_text(yaml.safe_dump(raw))
    assert cli("validate", cfg).exit_code == 0  # JSON text of a list: parsed
    rows[2]["perturbed_answers"] = "Lima; Rome"
    pd.DataFrame(rows).to_csv(tmp_path / "forget.csv", index=False)
    line = refused(["validate", str(cfg)], tmp_path)
    assert (
        f"data.forget ({tmp_path / 'forget.csv'}) row 3: column 'perturbed_answers': expected a non-empty list "
        "of non-empty strings, got str 'Lima; Rome'"
    ) in line


def test_errors_name_the_users_column(tiny_dir, tmp_path):
    sources = good_sources()
    sources["forget"] = [{("prompt" if k == "question" else k): v for k, v in r.items()} for r in sources["forget"]]
    sources["forget"][1]["prompt"] = None
    cfg = pipeline(tiny_dir, tmp_path, sources)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["columns"] = {"question": "prompt"}
    raw["data"].pop("retain")  # retain still calls it question
    raw["unlearn"] = {"method": "ga"}
    cfg.write_text(yaml.safe_dump(raw))
    assert "row 2: column 'prompt': expected a non-empty string, got null" in refused(["validate", str(cfg)], tmp_path)


def test_not_json_is_named_by_line(tiny_dir, tmp_path):
    cfg = pipeline(tiny_dir, tmp_path, good_sources())
    lines = (tmp_path / "retain.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-1]  # a truncated object
    (tmp_path / "retain.jsonl").write_text("\n".join(lines) + "\n")
    line = refused(["validate", str(cfg)], tmp_path)
    assert f"{tmp_path / 'retain.jsonl'} line 3: not valid JSON" in line


@pytest.mark.parametrize(
    "missing, subsets",
    [("drop", "subset/north=3, subset/south=3"), ("group", "subset/north=3, subset/south=3, subset/missing=2")],
)
def test_rows_without_the_attribute_are_dropped_or_grouped_when_asked(tiny_dir, tmp_path, missing, subsets):
    sources = good_sources()
    sources["forget"] = setting(setting(sources["forget"], 2, "group", None), 4, "group", ...)
    r = cli("validate", str(pipeline(tiny_dir, tmp_path, sources, split={"attribute": "group", "missing": missing})))
    assert r.exit_code == 0, r.output
    assert f"# subsets: forget=8, retain=8, holdout=4, general=4, mc=4, {subsets}" in r.output
    assert f"split.missing: {missing}: 2 of 8 forget rows have no 'group' value" in r.output


def test_duplicate_questions_are_reported_not_fatal(tiny_dir, tmp_path):
    sources = good_sources()
    sources["forget"][5]["question"] = sources["forget"][1]["question"]
    sources["retain"][0]["question"] = sources["forget"][0]["question"]
    r = cli("validate", str(pipeline(tiny_dir, tmp_path, sources)))
    assert r.exit_code == 0, r.output
    assert (
        f"data.forget ({tmp_path / 'forget.jsonl'}): 1 question(s) asked more than once, e.g. rows 2, 6: "
        f"{sources['forget'][1]['question']!r}"
    ) in r.output
    assert "1 question(s) are in both data.forget and data.retain" in r.output
