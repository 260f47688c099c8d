"""The shipped example configs pass every check of ``spunge validate``: the schema, the method, merge and suite
names, the files, the data (loaded and split), and a ``tune:`` section; for every variant.

An example points at things that are not in the repository: the demo benchmark (``spunge demo`` builds it
in spunge-demo/), a converted model (examples/smollm2/model), a cluster's files and a hub model
(llama2_7b_gpu.yaml), hub models and datasets (tofu.yaml). The test validates a copy of the example whose
paths to those things, and only those, are moved to local stand-ins: the tiny demo benchmark of the session
(the same layout, built by the same ``build_benchmark``), SmolLM2 converted from the packaged GGUF (what
``spunge convert-gguf`` writes), small parquet files with the columns the example names, and the benchmark's
fixture files in its hub schema (tests/fixtures/). Names, parameters and everything else are the
example's own, so a typo in an example fails here.
"""

from collections import Counter
from pathlib import Path

import pytest
import yaml

from orchestrator.config.loading import load_configs, load_tune
from orchestrator.config.schema import ConfigError
from tests.conftest import cli, qa_rows

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))

# what each example needs that the repository lacks (see ``stand_ins``); a new example must be added here
NEEDS = {
    "demo.yaml": "demo benchmark",
    "methods_demo.yaml": "demo benchmark",
    "tune_demo.yaml": "demo benchmark",
    "methods_seeds.yaml": "demo benchmark",
    "methods_seeds_tiny.yaml": "tiny demo benchmark",
    "yao_seven.yaml": "demo benchmark",
    "smollm2.yaml": "smollm2 model",
    "llama2_7b_gpu.yaml": "cluster files",
    "tofu.yaml": "tofu fixtures",
    "muse_news.yaml": "muse fixtures",
    "wmdp_spunge.yaml": "wmdp fixtures",
}
FIXTURES = Path(__file__).resolve().parent / "fixtures"
HUB = {  # hub datasets -> fixture files in their schema: (folder, {dataset: the prefix of its files})
    "tofu fixtures": (FIXTURES / "tofu", {"locuslab/TOFU": ""}),
    "muse fixtures": (FIXTURES / "muse_news", {"muse-bench/MUSE-News": ""}),
    "wmdp fixtures": (
        FIXTURES / "wmdp",
        {
            "cais/wmdp-bio-forget-corpus": "wmdp-bio-forget-corpus",
            "cais/wmdp-corpora": "wmdp-corpora",
            "cais/wmdp": "wmdp",
            "cais/mmlu": "mmlu",
        },
    ),
}
HUB_MODELS = {
    "tofu fixtures": (
        "open-unlearning/tofu_Llama-3.2-1B-Instruct_full",
        "open-unlearning/tofu_Llama-3.2-1B-Instruct_retain90",
    ),
    "muse fixtures": ("muse-bench/MUSE-news_target", "muse-bench/MUSE-news_retrain"),
    "wmdp fixtures": ("HuggingFaceH4/zephyr-7b-beta",),
}


def hub_to_files(node, folder: Path, datasets: dict[str, str]):
    """``node`` with every hub source of one of ``datasets`` (``{path: dataset, format: hub, name: config,
    split: split}``) turned into its fixture file ``folder/<prefix>_<config>_<split>.json``: the dataset's
    prefix, the config if any, the split unless it is the default ``train`` (JSON lines, as the hub's own
    files)."""
    if isinstance(node, dict):
        if node.get("format") == "hub" and node.get("path") in datasets:
            rest = {k: v for k, v in node.items() if k not in ("path", "format", "name", "split")}
            split = node.get("split", "train")
            parts = [datasets[node["path"]], node.get("name") or "", "" if split == "train" else split]
            return {"path": str(folder / ("_".join(p for p in parts if p) + ".json")), **rest}
        return {k: hub_to_files(v, folder, datasets) for k, v in node.items()}
    if isinstance(node, list):
        return [hub_to_files(v, folder, datasets) for v in node]
    return node


def gpu_data(folder: Path) -> Path:
    """Parquet stand-ins for llama2_7b_gpu.yaml's /data/*.parquet, with the columns its comment names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {k: r[k] for k in ("question", "answer", "paraphrased_answer", "perturbed_answers")}
        | {"domain": r["group"], "era": r["era"]}
        for r in qa_rows()
    ]
    files = {
        "forget": [r for r in rows if r["era"] == "old"],
        "retain": [r for r in rows if r["era"] == "new"],
        "holdout": rows[:4],
        "general": [{"text": r["answer"]} for r in rows],
    }
    for name, part in files.items():
        pq.write_table(pa.Table.from_pylist(part), folder / f"{name}.parquet")
    return folder


def stand_ins(name: str, request, tmp_path: Path) -> dict[str, str]:
    """Path prefixes of the example -> local stand-ins (outputs go under tmp_path)."""
    need = NEEDS[name]
    if need in ("demo benchmark", "tiny demo benchmark"):  # the fixture is a tiny-size demo benchmark
        bench = request.getfixturevalue("tiny_bench")[0]
        where = "../spunge-demo/tiny/benchmark" if need.startswith("tiny") else "../spunge-demo/benchmark"
        return {where: str(bench), "../spunge-demo": str(tmp_path / "spunge-demo")}
    if need in HUB_MODELS:  # the hub models -> SmolLM2 (a chat model, as TOFU's), outputs -> tmp
        model = str(request.getfixturevalue("smollm2"))
        return {**{m: model for m in HUB_MODELS[need]}, "../spunge-output": str(tmp_path / "spunge-output")}
    if need == "smollm2 model":
        return {
            "smollm2/model": str(request.getfixturevalue("smollm2")),
            "smollm2/data": str(EXAMPLES_DIR / "smollm2" / "data"),  # the shipped data, re-anchored
            "../spunge-output": str(tmp_path / "spunge-output"),
        }
    # the 7B recipe: the hub model name stays (validate checks no hub name offline); the oracle and the
    # data are a cluster's files
    return {
        "/data": str(gpu_data(tmp_path / "data")),
        "/models/llama2-7b-retain-oracle": str(request.getfixturevalue("tiny_dir") / "model"),
        "/shared/spunge/llama2-7b": str(tmp_path / "out"),
    }


def relocate(node, moves: dict[str, str], used: Counter):
    """``node`` with every string that is, or starts with, ``old/`` of a move rewritten to its ``new``."""
    if isinstance(node, dict):
        return {k: relocate(v, moves, used) for k, v in node.items()}
    if isinstance(node, list):
        return [relocate(v, moves, used) for v in node]
    if isinstance(node, str):
        for old, new in moves.items():
            if node == old or node.startswith(old + "/"):
                used[old] += 1
                return new + node[len(old) :]
    return node


def local_copy(path: Path, request, tmp_path: Path, **changes) -> Path:
    """The example with its unavailable paths moved to stand-ins (and ``changes``: dotted path -> value)."""
    raw = yaml.safe_load(path.read_text())
    if NEEDS[path.name] in HUB:
        raw = hub_to_files(raw, *HUB[NEEDS[path.name]])
    moves, used = stand_ins(path.name, request, tmp_path), Counter()
    raw = relocate(raw, moves, used)
    assert set(used) == set(moves), f"{path.name}: no path starts with {set(moves) - set(used)}: update NEEDS"
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    return copy


def test_every_example_is_validated():
    assert {p.name for p in EXAMPLES} == set(NEEDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_spunge_validate(path, request, tmp_path):
    copy = local_copy(path, request, tmp_path)
    raw = yaml.safe_load(path.read_text())
    r = cli("validate", copy)
    assert r.exit_code == 0, r.output
    assert r.output.count("# subsets: ") == len(raw.get("variants") or [None])  # data loaded and split, each
    runs = load_configs(copy)
    assert [name for name, _ in runs] == list(raw.get("variants") or [None])
    for name, cfg in runs:
        assert cfg.merge.method == "ties"
        changed = (raw.get("variants") or {}).get(name, {})
        assert cfg.unlearn.method == changed.get("unlearn.method", raw["unlearn"]["method"])
    if "tune" in raw:  # load_configs checked the section; `spunge tune` reads it with load_tune
        job = load_tune(copy)
        assert set(job.tune.space) == set(raw["tune"]["space"])


@pytest.mark.parametrize(
    "example, field, problem",
    [
        ("demo.yaml", "unlearn.method", "unlearn.method: unknown unlearning method 'npoo'"),
        (
            "yao_seven.yaml",
            "variants.ga_kl_retain.unlearn.method",
            "variants.ga_kl_retain.unlearn.method: unknown unlearning method 'npoo'",
        ),
    ],
)
def test_a_typo_in_an_example_fails_validation_naming_the_field(example, field, problem, request, tmp_path):
    path = EXAMPLES_DIR / example
    if field.startswith("variants."):  # a variant's change is a dotted key itself
        copy = local_copy(path, request, tmp_path)
        raw = yaml.safe_load(copy.read_text())
        raw["variants"]["ga_kl_retain"]["unlearn.method"] = "npoo"
        copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    else:
        copy = local_copy(path, request, tmp_path, **{field: "npoo"})
    with pytest.raises(ConfigError) as e:
        load_configs(copy)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems
    r = cli("validate", copy)
    assert r.exit_code == 2 and problem in r.output, r.output


def test_yao_seven_covers_the_seven_methods():
    raw = yaml.safe_load((Path(__file__).parent.parent / "examples" / "yao_seven.yaml").read_text())
    combos = {(v["unlearn.method"], v.get("unlearn.retain_source")) for v in raw["variants"].values()}
    assert combos == {
        ("ga", None),
        ("random_label", None),
        ("adversarial", None),
        ("grad_diff", "retain"),
        ("ga_kl", "retain"),
        ("grad_diff", "general"),
        ("ga_kl", "general"),
    }


def test_demo_example_is_what_spunge_demo_runs(tmp_path):
    from orchestrator.cli.demo import demo_config

    meta = {"template": "Question: {question}\nAnswer:", "split_attribute": "birth_decade"}
    root = Path(__file__).parent.parent
    made = demo_config(root / "spunge-demo" / "benchmark", meta, "small", root / "spunge-demo" / "run")
    shipped = yaml.safe_load((root / "examples" / "demo.yaml").read_text())
    assert shipped["unlearn"] == made["unlearn"] and shipped["merge"] == made["merge"]
    assert shipped["split"] == made["split"]
