"""Best-checkpoint selection (unlearn.select) on hand-made metric sequences, and the cost report's sums."""

import json
from pathlib import Path

import pytest

from jobs.spec import UnlearnSpec
from jobs.unlearn.outputs import STOP_FILE, snapshot_dir
from orchestrator.config.objective import objective_value
from orchestrator.config.schema import PipelineConfig, SelectConfig, StepRule
from orchestrator.run.context import Job, JobKind, Merged, RunContext
from orchestrator.stages.unlearn.selection import SELECT_FILE, StepSelector, choose_step, should_stop
from orchestrator.tracking.costs import add, cost_report, eval_cost, job_cost, known_pretraining_tokens

# forget_prob falls as the job unlearns; model_utility falls too, below 0.9 x base (1.0) after step 4
SEQUENCE = {
    2: {"forget_prob": 0.50, "model_utility": 0.95},
    4: {"forget_prob": 0.30, "model_utility": 0.92},
    6: {"forget_prob": 0.10, "model_utility": 0.80},
    8: {"forget_prob": 0.05, "model_utility": 0.70},
}
BASE = {"forget_prob": 0.9, "model_utility": 1.0}
RULE = {"metric": "forget_prob", "mode": "min", "constraints": [{"metric": "model_utility", "min_ratio_to_base": 0.9}]}


def make_ctx(tmp_path, select: dict) -> RunContext:
    raw = {
        "model": {"path": "org/model"},
        "data": {"forget": {"path": "/f.jsonl"}},
        "split": {"by": "attribute", "attribute": "author"},
        "unlearn": {"eval_every": 2, "select": select},
    }
    return RunContext(PipelineConfig.model_validate(raw), tmp_path)  # the schema only: no file is read


def make_job(tmp_path) -> Job:
    spec = UnlearnSpec(name="subset/a", model_path="m", forget_path="f", method="ga", output_dir=str(tmp_path / "job"))
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    return Job(JobKind.SUBSET, spec, "abc", subset="a")


def feed(sel: StepSelector, job: Job, steps, base=BASE) -> None:
    sel.launched[job.key], sel.scores[job.key], sel.refs[job.key] = set(), {}, {}
    sel._record(job, "base", 0, {"metrics": dict(base)})
    for step in steps:
        snapshot_dir(job.spec.output_dir, step).mkdir(parents=True)
        sel._record(
            job,
            "step",
            step,
            {"metrics": dict(SEQUENCE[step]), "started": 0.0, "ended": 2.0, "tokens": 100, "params": 10},
        )


def test_rule_picks_the_best_feasible_step_and_last_picks_the_last():
    rule, plain = StepRule(**RULE), StepRule(metric="forget_prob", mode="min")
    cands = [{"step": s, "metrics": m, **objective_value(rule, m, BASE)} for s, m in SEQUENCE.items()]
    # lowest forget_prob among steps keeping model_utility >= 0.9: step 4 (steps 6, 8 forget more but break it)
    assert choose_step(cands, rule)["step"] == 4
    assert choose_step(cands, "last")["step"] == 8
    # without the constraint the lowest forget_prob wins
    assert choose_step([{**c, **objective_value(plain, c["metrics"], BASE)} for c in cands], plain)["step"] == 8
    # patience 2: stop once two evaluated steps came after the best
    assert not should_stop(cands[:3], rule, 2) and should_stop(cands, rule, 2)
    assert not should_stop(cands, rule, 3) and not should_stop(cands, "last", 1)


def test_selector_chooses_prunes_stops_and_writes_its_choice(tmp_path):
    ctx = make_ctx(tmp_path, {"rule": RULE, "patience": 2})
    sel, job = StepSelector(ctx), make_job(tmp_path)
    feed(sel, job, [2, 4, 6])
    assert not (Path(job.spec.output_dir) / STOP_FILE).exists()
    # keep: best: the scored snapshots other than the best so far are gone
    assert [s for s in (2, 4, 6) if snapshot_dir(job.spec.output_dir, s).exists()] == [4]
    snapshot_dir(job.spec.output_dir, 8).mkdir(parents=True)
    sel._record(job, "step", 8, {"metrics": dict(SEQUENCE[8])})
    assert json.loads((Path(job.spec.output_dir) / STOP_FILE).read_text()) == {"after_step": 8}  # patience 2 reached
    sel.final_step[job.key] = 8
    chosen = sel.choose(job)
    assert chosen["step"] == 4 and chosen["snapshot"] and chosen["path"] == str(snapshot_dir(job.spec.output_dir, 4))
    assert chosen["stopped_early"] == 8 and [c["step"] for c in chosen["candidates"]] == [2, 4, 6, 8]
    assert job.model_dir == chosen["path"] and job.model_hash == "abc-step4"
    assert json.loads((Path(job.spec.output_dir) / SELECT_FILE).read_text())["step"] == 4
    # the curves start at the base (step 0) and carry the objective
    curves = sel.curves(job)
    assert [r["step"] for r in curves] == [0, 2, 4, 6, 8]
    assert curves[2]["eval/forget_prob"] == 0.30 and curves[2]["eval/objective"] == pytest.approx(0.30)
    # the scored steps' eval task costs: 2 s x 1 CPU, 2 x 10 params x 100 tokens each (steps 2, 4, 6)
    assert add(*job.select_costs)["flops"] == pytest.approx(3 * 2 * 10 * 100)


def test_the_last_step_is_the_output_folder_and_a_rule_waits_for_the_base(tmp_path):
    ctx = make_ctx(tmp_path, {"rule": "last"})
    sel, job = StepSelector(ctx), make_job(tmp_path)
    feed(sel, job, [2, 4])
    sel._record(job, "step", 6, {"metrics": dict(SEQUENCE[6])})  # the final step: the job's output folder
    sel.final_step[job.key] = 6
    chosen = sel.choose(job)
    assert chosen["step"] == 6 and not chosen["snapshot"] and job.model_dir == job.spec.output_dir
    assert job.model_hash == "abc"
    assert not any(snapshot_dir(job.spec.output_dir, s).exists() for s in (2, 4))  # keep: best

    ruled, job2 = StepSelector(make_ctx(tmp_path / "r", {"rule": RULE})), make_job(tmp_path / "r")
    ruled.launched[job2.key], ruled.scores[job2.key], ruled.refs[job2.key] = set(), {}, {}
    ruled._record(job2, "step", 2, {"metrics": dict(SEQUENCE[2])})
    assert ruled._candidates(job2) == []  # a ratio to the base needs the base's score first
    ruled._record(job2, "base", 0, {"metrics": dict(BASE)})
    assert [c["step"] for c in ruled._candidates(job2)] == [2]


def test_a_rule_naming_a_metric_no_suite_makes_fails_with_the_field(tmp_path):
    from orchestrator.run.context import PipelineError

    sel = StepSelector(make_ctx(tmp_path, {"rule": {"metric": "forget_quality"}}))
    job = make_job(tmp_path)
    feed(sel, job, [2])
    sel.final_step[job.key] = 2
    with pytest.raises(PipelineError, match=r"unlearn.select.rule: metric 'forget_quality' is not among"):
        sel.choose(job)


def test_select_config_needs_eval_every_and_sampled_splits():
    from orchestrator.config.checks import check_select
    from orchestrator.config.schema import PipelineConfig

    cfg = PipelineConfig.model_validate(
        {
            "model": {"path": "m"},
            "data": {"forget": {"path": "f"}},
            "split": {"by": "attribute", "attribute": "a"},
            "unlearn": {"select": {"rule": RULE, "suites": ["mc"]}},
        }
    )
    found = check_select(cfg)
    assert "unlearn.select: a rule or patience scores evaluated steps; set unlearn.eval_every" in found
    assert any(p.startswith("unlearn.select.suites.0: the mc suite needs a multiple-choice file") for p in found)
    with pytest.raises(ValueError, match="patience"):
        SelectConfig(patience=0)


def test_costs_add_up_across_stages(tmp_path):
    ctx = make_ctx(tmp_path, {"rule": "last"})
    ctx.cfg.report.pretraining_tokens = 1e9
    scaling = ctx.cfg.scaling.model_copy(update={"num_workers": 2, "cpus_per_worker": 3})
    history = [{"step": 1, "step_tokens": 40}, {"step": 2, "step_tokens": 60}]
    cost = job_cost(history, {"seconds": 10.0, "final_metrics": {"params": 1000}}, scaling)
    # 10 s x 2 workers x 3 CPUs; 100 tokens; 6 x 1000 params x 100 tokens
    assert (cost["device_s"], cost["tokens"], cost["flops"]) == (60.0, 100.0, 6e5)
    ev = eval_cost({"started": 5.0, "ended": 9.0, "tokens": 50, "params": 1000}, cpus=2, gpus=0)
    assert (ev["device_s"], ev["tokens"], ev["flops"]) == (8.0, 50.0, 1e5)
    job = make_job(tmp_path)
    job.cost, job.select_costs = cost, [ev, ev]
    ctx.jobs = [job]
    ctx.stage_seconds = {"prepare": 1.5}
    ctx.merged = Merged("m", "h", False, seconds=3.0)
    ctx.models = {"merged": ("m", "h")}
    ctx.results = {"merged": {"suites": {"qa": {"started": 0.0, "ended": 2.0, "tokens": 30, "params": 1000}}}}
    r = cost_report(ctx)
    stages = r["stages"]
    assert stages["select"]["flops"] == 2e5 and stages["evaluate"]["flops"] == 2 * 1000 * 30
    assert stages["merge"]["device_s"] == 3.0 and stages["prepare"]["device_s"] == 1.5
    assert r["total"]["device_s"] == pytest.approx(1.5 + 60 + 16 + 3 + 2)
    assert r["total"]["tokens"] == 100 + 100 + 30
    assert r["total"]["flops"] == pytest.approx(6e5 + 2e5 + 6e4)
    assert r["retrain_flops"] == 6 * 1000 * 1e9
    assert r["retrain_vs_unlearning"] == pytest.approx(6e12 / 8e5)
    assert r["retrain_vs_pipeline"] == pytest.approx(6e12 / 8.6e5)
    assert r["pretraining_tokens_source"] == "report.pretraining_tokens"


def test_known_models_pretraining_tokens_by_name():
    assert known_pretraining_tokens("/models/SmolLM2-135M-Instruct") == (2e12, "smollm2-135m")
    assert known_pretraining_tokens("open-unlearning/tofu_Llama-3.2-1B-Instruct_full") == (9e12, "llama-3.2-1b")
    assert known_pretraining_tokens("/tmp/tiny/model") is None


def test_eval_tasks_count_the_tokens_their_forward_passes_take(tiny_dir):
    import torch

    from jobs.evaluate.suites import count_tokens
    from jobs.models import load_model

    model = load_model(tiny_dir / "model")
    counter = count_tokens(model)
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert counter[0] == 7  # padding excluded
    with torch.no_grad():
        model.generate(
            input_ids=ids[1:],
            attention_mask=mask[1:],
            max_new_tokens=3,
            do_sample=False,
            min_new_tokens=3,
            pad_token_id=0,
        )
    assert counter[0] == 7 + 4 + 2  # the prompt once, then one position per new token (the last one not fed back)
