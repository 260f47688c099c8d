"""Config loading, field-path errors, and `spunge validate` (exit 2, one line per problem)."""

import json
import sys

import pytest
import yaml

from orchestrator.config.loading import load_config
from orchestrator.config.schema import ConfigError, flatten
from tests.conftest import cli


@pytest.fixture
def config_file(tiny_dir, tmp_path):
    def write(**changes):
        raw = {
            "model": {"path": str(tiny_dir / "model")},
            "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
            "split": {"attribute": "group"},
            "unlearn": {"method": "npo", "params": {"beta": 0.2}, "optimizer": {"lr": 1e-4}},
        }
        for dotted, value in changes.items():
            node = raw
            *parents, leaf = dotted.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        p = tmp_path / "pipe.yaml"
        p.write_text(yaml.safe_dump(raw))
        return p

    return write


def problems(path):
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.problems


def test_a_valid_config_resolves_defaults_and_relative_paths(config_file, tiny_dir, tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = load_config(config_file(deepspeed="ds.json", storage={"output_dir": "out"}))
    assert cfg.unlearn.params == {"beta": 0.2} and cfg.merge.method == "ties"
    assert cfg.deepspeed_dict() == {"zero_optimization": {"stage": 2}}
    assert cfg.storage.output_dir == str(tmp_path / "out")
    assert cfg.data.forget.path == str(tiny_dir / "forget.jsonl")


def test_errors_name_the_field_path(config_file):
    found = problems(config_file(unlearn__optimizer__lr=-1, unlearn__bogus=1, scaling={"num_workers": -1}))
    assert any(p.startswith("unlearn.optimizer.lr: ") and "greater than 0" in p for p in found)
    assert any(p.startswith("unlearn.bogus: ") for p in found)
    assert any(p.startswith("scaling.num_workers: ") for p in found)


def test_registry_checks_method_params_merge_method_and_files(config_file):
    assert problems(config_file(unlearn__method="nope"))[0].startswith(
        "unlearn.method: unknown unlearning method 'nope'"
    )
    assert problems(config_file(unlearn__params={"beta": 0}))[0].startswith("unlearn.params.beta: ")
    assert problems(config_file(merge={"method": "tie"}))[0].startswith("merge.method: unknown mergekit method 'tie'")
    assert (
        problems(config_file(data__holdout="/nonexistent/h.jsonl"))[0]
        == "data.holdout.path: no such file /nonexistent/h.jsonl"
    )
    assert problems(config_file(deepspeed="missing.json"))[0].startswith("deepspeed: no such file")


def test_flatten_makes_dotted_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": [1, 2], "d": None}


def test_cli_validate_prints_the_resolved_config_and_subsets(config_file):
    r = cli("validate", config_file())
    assert r.exit_code == 0, r.output
    assert "method: npo" in r.output and "subset/north=4" in r.output and "subset/south=4" in r.output


def test_cli_validate_exits_2_with_one_line_per_problem(config_file):
    path = config_file(unlearn__optimizer__lr=-1, scaling={"num_workers": -1})
    r = cli("validate", path)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith(f"error: {path}: ") for line in lines)
    assert "Traceback" not in r.output


def test_cli_validate_rejects_an_unknown_split_attribute_before_anything_runs(config_file):
    r = cli("validate", str(config_file(split={"attribute": "genre"})))
    assert r.exit_code == 2
    assert "split.attribute: column 'genre' is not in the forget data" in r.output


def test_a_retain_term_without_retain_data_is_named(config_file, tiny_dir):
    path = config_file(unlearn={"method": "ga", "params": {}}, data={"forget": str(tiny_dir / "forget.jsonl")})
    assert load_config(path).unlearn.method == "ga"  # plain GA needs no retain data
    path = config_file(
        unlearn={"method": "random_label", "params": {"alpha": 1.0}}, data={"forget": str(tiny_dir / "forget.jsonl")}
    )
    assert problems(path)[0].startswith("data.retain: method 'random_label'")
    path = config_file(unlearn={"method": "ga", "params": {}, "retain_source": "general"})
    assert problems(path)[0].startswith("data.general: ")


def test_variants_expand_into_named_pipelines_with_their_own_output(config_file, tmp_path):
    from orchestrator.config.loading import load_configs

    path = config_file(
        storage={"output_dir": "out"},
        name="sweep",
        variants={"fast": {"unlearn.optimizer.lr": 1e-3}, "gd": {"unlearn.method": "grad_diff", "unlearn.params": {}}},
    )
    runs = load_configs(path)
    assert [n for n, _ in runs] == ["fast", "gd"]
    fast, gd = runs[0][1], runs[1][1]
    assert fast.name == "sweep/fast" and fast.unlearn.optimizer.lr == 1e-3 and fast.unlearn.method == "npo"
    assert gd.unlearn.method == "grad_diff" and gd.unlearn.optimizer.lr == 1e-4
    assert fast.storage.output_dir == str(tmp_path / "out" / "fast")
    bad = config_file(variants={"ok": {}, "broken": {"unlearn.method": "nope"}})
    with pytest.raises(ConfigError) as e:
        load_configs(bad)
    assert e.value.problems[0].startswith("variants.broken.unlearn.method: unknown unlearning method")


def test_chat_template_on_a_tokenizer_without_one_is_one_line_at_validate(config_file):
    path = config_file(data__template="chat")  # the tiny BPE tokenizer has no chat template
    r = cli("validate", path)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.template: chat: tokenizer of" in lines[0] and "has no chat template" in lines[0]


def test_prompt_fields_reach_the_prompt_format(config_file):
    cfg = load_config(config_file(data__answer_eos=False))
    assert cfg.data.prompt_format().answer_eos is False and cfg.data.prompt_format().template == cfg.data.template
    assert any("system_prompt needs template: chat" in p for p in problems(config_file(data__system_prompt="Hi")))
    assert any(
        "data.template: Value error, must contain '{question}', or be 'chat'" in p
        for p in problems(config_file(data__template="Q:"))
    )


def test_lora_and_memory_options_are_checked_against_each_other(config_file):
    ok = load_config(
        config_file(
            unlearn__lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
            unlearn__gradient_checkpointing=True,
            merge={"output": "adapter"},
        )
    )
    assert ok.unlearn.lora.r == 4 and ok.unlearn.lora.alpha == 16 and ok.merge.output == "adapter"
    found = problems(config_file(unlearn__lora={"r": 4}, unlearn__localize={"fraction": 0.1}))
    assert any(p.startswith("unlearn.localize: cannot be combined with unlearn.lora") for p in found)
    found = problems(config_file(merge={"output": "adapter"}))
    assert any(p.startswith("merge.output: adapter needs unlearn.lora") for p in found)
    found = problems(config_file(unlearn__lora={"r": 4}, merge={"method": "dare_ties"}))
    assert any(p.startswith("merge.method: 'dare_ties' cannot merge LoRA adapters") for p in found)
    found = problems(config_file(model__attn_implementation="flash_attention_2"))
    assert any(p.startswith("model.attn_implementation: flash_attention_2 needs the flash_attn package") for p in found)
    # tvn's jobs output full (negated) models, merged by mergekit: any method; but not into an adapter
    load_config(
        config_file(
            unlearn__method="tvn",
            unlearn__params={"order": "negate_then_merge"},
            unlearn__lora={"r": 4},
            merge={"method": "dare_ties"},
        )
    )
    found = problems(
        config_file(unlearn__method="tvn", unlearn__params={}, unlearn__lora={"r": 4}, merge={"output": "adapter"})
    )
    assert any("rewrites the merged weights" in p for p in found)


def test_memory_per_worker_caps_how_many_jobs_run_at_once(config_file, monkeypatch):
    import orchestrator.stages.unlearn as P

    res = {"CPU": 8.0, "memory": 10 * 2**30}
    monkeypatch.setattr(P.ray, "cluster_resources", lambda: res)
    monkeypatch.setattr(P.ray, "nodes", lambda: [{"Alive": True, "Resources": res}])
    assert P.job_capacity(load_config(config_file())) == 8  # CPUs alone
    assert P.job_capacity(load_config(config_file(scaling={"memory_per_worker_gb": 4}))) == 2
    # the merge actor's reservation (3 GiB) is held beside the jobs: 7 GiB left, one 4 GiB job
    assert P.job_capacity(load_config(config_file(scaling={"memory_per_worker_gb": 4})), 3 * 2**30) == 1
    with pytest.raises(
        P.PipelineError,
        match=r"one unlearning job needs 1 x \{CPU: 1, memory: 12 GiB\}, more than "
        r"the cluster has \(8 CPU, 10 GiB memory\); on a cluster that grows, set "
        r"scaling.wait_for_resources_s",
    ):
        P.job_capacity(load_config(config_file(scaling={"memory_per_worker_gb": 12, "wait_for_resources_s": 0})))


def test_an_in_process_job_holds_one_workers_resources_in_its_task_and_refuses_restarts(config_file, monkeypatch):
    import orchestrator.stages.unlearn as P
    from orchestrator.remote.runners import unlearn_task_options

    local = load_config(config_file(scaling={"num_workers": 0, "cpus_per_worker": 2, "memory_per_worker_gb": 1}))
    assert local.scaling.ranks == 1
    assert unlearn_task_options(local.scaling) == {"num_cpus": 2.0, "scheduling_strategy": "DEFAULT", "memory": 2**30}
    assert unlearn_task_options(load_config(config_file()).scaling) == {}  # its Ray Train workers hold them
    gpu = load_config(config_file(scaling={"num_workers": 0, "use_gpu": True}))
    assert unlearn_task_options(gpu.scaling) == {
        "num_cpus": 1.0,
        "scheduling_strategy": "DEFAULT",
        "num_gpus": 1.0,
        "max_calls": 1,
    }
    res = {"CPU": 8.0, "memory": 10 * 2**30}
    monkeypatch.setattr(P.ray, "cluster_resources", lambda: res)
    monkeypatch.setattr(P.ray, "nodes", lambda: [{"Alive": True, "Resources": res}])
    assert P.job_capacity(local) == 4  # one rank of 2 CPUs per job
    assert problems(config_file(scaling={"num_workers": 0, "max_failures": 2})) == [
        "scaling.max_failures: 2 restarts Ray Train workers, and num_workers: 0 has none (each job runs in its "
        "runner task's process); leave it unset or 0, or use num_workers: 1"
    ]
    assert load_config(config_file(scaling={"num_workers": 0, "max_failures": 0})).scaling.max_failures == 0


def test_gpu_defaults_and_each_bad_gpu_combination_is_one_line(config_file):
    gpu = {"use_gpu": True, "num_workers": 2}
    cfg = load_config(config_file(scaling=gpu))
    assert cfg.scaling.gpus_per_worker == 1 and cfg.eval.gpus_per_task == 1 and cfg.eval.device == "auto"
    assert load_config(config_file()).eval.gpus_per_task == 0  # no GPU training: CPU eval by default
    cpu_eval = load_config(config_file(scaling=gpu, eval={"device": "cpu"}))
    assert cpu_eval.eval.gpus_per_task == 0  # said explicitly: the task hides the GPUs
    assert load_config(config_file(scaling=gpu, eval={"gpus_per_task": 4})).eval.gpus_per_task == 4
    assert problems(config_file(scaling=gpu, eval={"gpus_per_task": 0})) == [
        "eval.gpus_per_task: 0 with scaling.use_gpu: true leaves each eval task's model on a GPU it did not reserve, "
        "beside the training workers; reserve 1 or more, or set eval.device: cpu"
    ]
    assert problems(config_file(scaling={**gpu, "gpus_per_worker": 0.5})) == [
        "scaling.gpus_per_worker: 0.5 with num_workers 2 can put two NCCL ranks of one job on one GPU, which NCCL "
        "refuses; use whole GPUs per worker, or num_workers: 1 to share GPUs between jobs"
    ]
    # one worker per job sharing a GPU with other jobs' workers is fine (fan-out on one GPU)
    assert load_config(config_file(scaling={"use_gpu": True, "gpus_per_worker": 0.25})).scaling.gpus_per_worker == 0.25
    assert problems(config_file(eval={"device": "cpu", "gpus_per_task": 1})) == [
        "eval.gpus_per_task: 1.0 with eval.device: cpu reserves GPUs the task hides; set 0 or eval.device: auto"
    ]
    # each through `spunge validate`: one line, exit 2
    for bad in (
        {"scaling": gpu, "eval": {"gpus_per_task": 0}},
        {"scaling": {**gpu, "gpus_per_worker": 0.5}},
        {"eval": {"device": "cpu", "gpus_per_task": 2}},
    ):
        r = cli("validate", str(path := config_file(**bad)))
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert r.output.startswith(f"error: {path}: ") and "Traceback" not in r.output
    assert problems(config_file(scaling=gpu, eval={"gpus_per_task": 1.5})) == [
        "eval.gpus_per_task: 1.5 is a fraction above 1, which Ray cannot reserve; use a fraction below 1 or a whole "
        "number"
    ]


def test_each_suite_declares_its_data_options_and_checks(config_file, tmp_path):
    found = problems(config_file(eval={"suites": ["qa", "mia", "mc", "perplexity", "nope"]}))
    assert (
        "eval.suites.4: unknown evaluation suite 'nope'; known: knowmem, lens, lmeval, mc, memorization, mia, "
        "perplexity, probes, qa, quant, relearn, verbmem" in found
    )
    needs = sorted(p.split(":")[0] + ": " + p.split(": ")[1].split(" needs")[0] for p in found if p.startswith("data."))
    assert needs == ["data.general: the perplexity suite", "data.holdout: the mia suite", "data.mc: the mc suite"]
    # options sections are the suites' own models: eval.<suite>.<option>, validated by field
    found = problems(config_file(eval={"suites": ["qa"], "qa": {"stop": "\n"}, "mia": {"k": 2}, "mc": {"bogus": 1}}))
    assert {p.split(":")[0] for p in found} == {"eval.qa.stop", "eval.mia.k", "eval.mc.bogus"}
    # lmeval: data.mc only for its spunge_mc task; its task folder is a path resolved against the config
    (tmp_path / "tasks").mkdir()
    cfg = load_config(config_file(eval={"suites": ["lmeval"], "lmeval": {"tasks": ["other"], "include_path": "tasks"}}))
    assert cfg.eval.suite_options("lmeval")["include_path"] == str(tmp_path / "tasks")
    assert cfg.eval.suite_options("qa") == {
        "stop": [],
        "normalized_prob": ["real_authors", "world_facts"],
        "utility": ["retain", "real_authors", "world_facts"],
    }
    assert cfg.eval.suite_options("perplexity") == {}
    found = problems(config_file(eval={"suites": ["lmeval"], "lmeval": {"include_path": "missing"}}))
    assert found == [
        "data.mc: the lmeval suite needs a multiple-choice file (question, choices, answer), but it is not set",
        "eval.lmeval: include_path: no such folder missing (expected task YAMLs)",
    ]


def test_optional_extras_are_checked_up_front(config_file, monkeypatch, tmp_path):
    """A config that needs an extra that is not installed fails at validate, naming the pip command."""
    from orchestrator.config.loading import load_tune

    for module in ("optuna", "lm_eval", "peft"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    found = problems(config_file(eval={"suites": ["lmeval"], "lmeval": {"tasks": ["other"]}}, unlearn__lora={"r": 4}))
    assert (
        "eval.lmeval: the lmeval suite (lm-evaluation-harness) needs the lm_eval package: pip install "
        "'spunge[lmeval]'" in found
    )
    assert "unlearn.lora: LoRA (unlearn.lora) needs the peft package: pip install peft" in found
    path = config_file(
        tune={
            "space": {"unlearn.optimizer.lr": {"choice": [1e-4]}},
            "search": "optuna",
            "objective": {"metric": "forget_prob", "mode": "min"},
        }
    )
    with pytest.raises(ConfigError) as e:
        load_tune(path)
    assert e.value.problems == ["tune.search: optuna needs the optuna package: pip install 'spunge[tune]'"]
    r = cli("tune", path)
    assert r.exit_code == 2 and "pip install 'spunge[tune]'" in r.output


def test_a_password_in_a_uri_is_never_printed_or_logged(config_file):
    from orchestrator.config.schema import flatten, public_dump

    path = config_file(tracking={"uri": "http://alice:s3cretpw@mlflow.internal:5000"})
    cfg = load_config(path)
    assert cfg.tracking.uri == "http://alice:s3cretpw@mlflow.internal:5000"  # the run itself uses it
    assert flatten(public_dump(cfg))["tracking.uri"] == "http://alice:***@mlflow.internal:5000"  # MLflow params
    r = cli("validate", path)
    assert r.exit_code == 0 and "http://alice:***@mlflow.internal:5000" in r.output and "s3cretpw" not in r.output


def test_eval_sets_resolve_like_sources_and_bad_names_or_files_are_named(config_file, tiny_dir, tmp_path):
    import shutil

    shutil.copy(tiny_dir / "retain.jsonl", tmp_path / "ra.jsonl")
    cfg = load_config(
        config_file(data__eval_sets={"real_authors": "ra.jsonl", "retain": {"path": str(tiny_dir / "retain.jsonl")}})
    )
    assert cfg.data.eval_sets["real_authors"].path == str(tmp_path / "ra.jsonl")  # relative to the config
    assert set(cfg.data.sources()) == {"forget", "retain", "eval_sets.real_authors", "eval_sets.retain"}
    found = problems(config_file(data__eval_sets={"mc": "ra.jsonl"}))
    assert found[0].startswith("data.eval_sets: ") and "split name 'mc': expected lower_snake_case" in found[0]
    assert problems(config_file(data__eval_sets={"Real Authors": "ra.jsonl"}))[0].startswith("data.eval_sets: ")
    found = problems(config_file(data__eval_sets={"world_facts": "nowhere.jsonl"}))
    assert any(p.startswith("data.eval_sets.world_facts.path: no such file") for p in found), found


def test_a_source_of_parts_concatenates_them_with_their_set_columns(config_file, tiny_dir, tmp_path):
    from jobs.data.io import load_jsonl
    from orchestrator.stages.prepare import load_source

    (tmp_path / "a.jsonl").write_text('{"text": "anthrax spores survive heat."}\n{"text": "ricin is a toxin."}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "a buffer overflow writes past an array."}\n')
    cfg = load_config(
        config_file(
            data__mc={
                "parts": [
                    {"path": "a.jsonl", "set": {"domain": "bio"}},
                    {"path": "b.jsonl", "set": {"domain": "cyber"}},
                ]
            }
        )
    )
    src = cfg.data.mc
    assert [leaf.path for leaf in src.leaves()] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert src.label() == f"{tmp_path / 'a.jsonl'} + {tmp_path / 'b.jsonl'}"
    rows = load_source(src)
    assert rows == [{**r, "domain": "bio"} for r in load_jsonl(tmp_path / "a.jsonl")] + [
        {"text": "a buffer overflow writes past an array.", "domain": "cyber"}
    ]
    found = problems(config_file(data__mc={"parts": ["a.jsonl", "missing.jsonl"]}))
    assert any(p.startswith("data.mc.parts.1.path: no such file") for p in found), found
    found = problems(config_file(data__mc={"path": "a.jsonl", "parts": ["b.jsonl"]}))
    assert any(p.startswith("data.mc: ") and "both given" in p for p in found), found


def test_a_global_batch_that_does_not_split_over_the_workers_is_one_line(config_file):
    found = problems(config_file(unlearn__global_batch_size=9, scaling__num_workers=2))
    assert found == [
        "unlearn.global_batch_size: 9 rows do not split evenly over 2 workers (scaling.num_workers); "
        "use a multiple of 2"
    ]
    found = problems(config_file(unlearn__global_batch_size=8, unlearn__gradient_accumulation_steps=2))
    assert len(found) == 1 and found[0].startswith("unlearn.gradient_accumulation_steps: set it or")
    assert load_config(config_file(unlearn__global_batch_size=8, scaling__num_workers=2)).unlearn.global_batch_size == 8
