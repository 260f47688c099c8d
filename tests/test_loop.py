"""The DeepSpeed training loop in this process (rank 0 of 1): it unlearns, reports, saves, stops on NaN."""

import json
import math

import pytest
import torch

from jobs.data.format import collate, encode_qa, encode_text
from jobs.data.io import load_jsonl
from jobs.models import load_model, load_tokenizer
from jobs.spec import UnlearnSpec
from jobs.unlearn.engine import deepspeed_config
from jobs.unlearn.loop import NonFiniteLossError, run_unlearning
from jobs.unlearn.methods.base import mean_nll
from jobs.unlearn.outputs import JOB_MARKER


def spec(tiny_dir, tmp_path, **kw) -> UnlearnSpec:
    base = dict(
        name="subset/old",
        model_path=str(tiny_dir / "model"),
        forget_path=str(tiny_dir / "forget.jsonl"),
        retain_path=str(tiny_dir / "retain.jsonl"),
        method="grad_diff",
        optimizer={"lr": 3e-3},
        max_steps=6,
        batch_size=4,
        output_dir=str(tmp_path / "out"),
    )
    return UnlearnSpec(**{**base, **kw})


def forget_nll(model_dir, tiny_dir) -> float:
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    batch = collate(
        [encode_qa(tok, r["question"], r["answer"]) for r in load_jsonl(tiny_dir / "forget.jsonl")], tok.pad_token_id
    )
    with torch.no_grad():
        return mean_nll(model, batch).item()


def test_deepspeed_config_fills_batch_fields_like_auto():
    s = UnlearnSpec(
        name="x",
        model_path="m",
        forget_path="f",
        method="ga",
        batch_size=4,
        gradient_accumulation_steps=2,
        output_dir="o",
        deepspeed={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}},
    )
    cfg = deepspeed_config(s, world_size=3)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 24 and cfg["zero_optimization"] == {"stage": 2}


def test_a_worker_imports_deepspeed_without_mlflow_and_can_still_import_mlflow():
    """In a fresh process, as a Ray Train worker starts: DeepSpeed's autotuner does not pull in mlflow (1.1 s of
    each worker's start), the shared-memory op is not built, and mlflow imports normally afterwards."""
    import subprocess
    import sys

    code = (
        "import sys, json; from jobs.unlearn.engine import import_deepspeed; ds = import_deepspeed(); "
        "had = 'mlflow' in sys.modules; import deepspeed.autotuning.autotuner as a; import mlflow; "
        "c = __import__('importlib').import_module('deepspeed.comm.torch'); "
        "print(json.dumps([had, a.has_mlflow, mlflow.__name__, c.build_shm_op() is None, "
        "ds is sys.modules['deepspeed']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False, "mlflow", True, True]


def test_optimizer_offload_lets_deepspeed_step_the_loops_own_torch_optimizer():
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    s = UnlearnSpec(name="x", model_path="m", forget_path="f", method="ga", output_dir="o", deepspeed=offload)
    assert deepspeed_config(s, world_size=1)["zero_force_ds_cpu_optimizer"] is False
    own = {**offload, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}  # DeepSpeed's optimizer: left alone
    assert "zero_force_ds_cpu_optimizer" not in deepspeed_config(s.model_copy(update={"deepspeed": own}), world_size=1)
    assert "zero_force_ds_cpu_optimizer" not in deepspeed_config(s.model_copy(update={"deepspeed": {}}), world_size=1)


@pytest.mark.parametrize("stage", [0, 3])
def test_unlearning_raises_forget_loss_reports_every_step_and_saves_hf_folder(
    tiny_dir, tmp_path, single_process_dist, stage
):
    s = spec(tiny_dir, tmp_path, deepspeed={"zero_optimization": {"stage": stage}}, report_interval_s=0)
    batches = []
    final = run_unlearning(s, report=batches.append)
    assert all(len(b) == 1 for b in batches)  # interval 0: a report every step
    reports = [row for b in batches for row in b]
    assert [r["step"] for r in reports] == list(range(1, 7))
    assert {"loss", "forget_loss", "retain_loss", "grad_norm", "lr", "tokens_per_s"} <= set(reports[-1])
    assert all(r["grad_norm"] > 0 for r in reports) and reports[-1]["lr"] == pytest.approx(3e-3)
    assert reports[-1]["forget_loss"] > reports[0]["forget_loss"]
    assert final == reports[-1]
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / JOB_MARKER).read_text())["final_metrics"]["step"] == 6
    assert forget_nll(out, tiny_dir) > forget_nll(tiny_dir / "model", tiny_dir) + 0.05


def test_reports_batch_the_steps_between_intervals(tiny_dir, tmp_path, single_process_dist):
    batches = []
    run_unlearning(spec(tiny_dir, tmp_path, report_interval_s=3600), report=batches.append)
    assert len(batches) == 1 and [r["step"] for r in batches[0]] == list(range(1, 7))


def test_a_non_finite_loss_stops_the_job_with_a_clear_error(tiny_dir, tmp_path, single_process_dist):
    s = spec(
        tiny_dir,
        tmp_path,
        method="ga",
        optimizer={"name": "sgd", "lr": 1e30},
        max_steps=20,
        deepspeed={"gradient_clipping": 0.0},
    )
    with pytest.raises(NonFiniteLossError, match=r"job subset/old: loss became (nan|-?inf) at step \d+ \(method ga"):
        run_unlearning(s)
    assert not (tmp_path / "out" / JOB_MARKER).exists()


def test_retain_term_can_train_on_general_text(tiny_dir, tmp_path, single_process_dist):
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"Writers often travel to {t}."}) + "\n" for t in ("Oslo", "Lima")))
    batches = []
    run_unlearning(
        spec(tiny_dir, tmp_path, retain_path=str(general), retain_format="text", report_interval_s=0),
        report=batches.append,
    )
    # step 1's retain loss is the base model's NLL of both general sentences (one batch, every token a target)
    tok, model = load_tokenizer(tiny_dir / "model"), load_model(tiny_dir / "model")
    rows = [encode_text(tok, r["text"]) for r in load_jsonl(general)]
    with torch.no_grad():
        want = mean_nll(model, collate(rows, tok.pad_token_id)).item()
    assert batches[0][0]["retain_loss"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("stage", [0, 3])
def test_localized_unlearning_changes_nothing_outside_the_mask(tiny_dir, tmp_path, single_process_dist, stage):
    from safetensors.torch import load_file

    s = spec(
        tiny_dir,
        tmp_path,
        deepspeed={"zero_optimization": {"stage": stage}},
        optimizer={"lr": 1e-2, "weight_decay": 0.1},
        localize={"attribution": "gradient", "fraction": 0.05, "scope": "mlp"},
    )
    final = run_unlearning(s)
    before = load_file(tiny_dir / "model" / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    mlp = [n for n in before if ".mlp." in n and before[n].dim() == 2]
    budget = round(0.05 * sum(before[n].numel() for n in mlp))
    assert final["localize/kept"] == budget
    for name, w in before.items():  # tensor by tensor: outside the MLP scope nothing moved
        if name not in mlp:
            assert torch.equal(after[name], w), name
    changed = sum(int((after[n] != before[n]).sum()) for n in mlp)
    assert 0 < changed <= budget  # weight decay (0.1) touched nothing outside the 5% mask


def test_the_loop_syncs_once_per_optimizer_step(tiny_dir, tmp_path, single_process_dist, monkeypatch):
    """The sync budget: per optimizer step the loop and the method make at most one collective (the packed
    all_reduce) and one device-to-host read (``tolist``), however many micro-steps the step has; calls
    made by DeepSpeed itself are not counted."""
    import sys

    import torch.distributed as dist

    calls = {"collective": 0, "read": 0}

    def ours() -> bool:  # the caller of the wrapped function is the loop or a method
        name = sys._getframe(2).f_code.co_filename.replace("\\", "/")
        return "/jobs/unlearn/" in name

    def counting(kind, fn):
        def wrapped(*a, **kw):
            if ours():
                calls[kind] += 1
            return fn(*a, **kw)

        return wrapped

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter"):
        monkeypatch.setattr(dist, name, counting("collective", getattr(dist, name)))
    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting("read", getattr(torch.Tensor, name)))
    batches = []
    run_unlearning(
        spec(tiny_dir, tmp_path, gradient_accumulation_steps=2, report_interval_s=3600), report=batches.append
    )
    assert [r["step"] for b in batches for r in b] == list(range(1, 7))
    assert calls == {"collective": 0, "read": 6}  # one rank: nothing to agree on, no collective at all
    # with more ranks the step's numbers travel in one all_reduce (here on this one-rank group)
    from jobs.unlearn.loop import sync_step

    shared, local = sync_step("cpu", [torch.tensor(True), 12, 0.0], {"loss": torch.tensor(2.5), "kl": 0.5}, world=2)
    assert calls == {"collective": 1, "read": 7}
    assert shared == [1.0, 12.0, 0.0] and local == {"loss": 2.5, "kl": 0.5}


def test_eval_every_writes_snapshots_and_a_stop_file_ends_the_job(tiny_dir, tmp_path, single_process_dist):
    """Every eval_every steps the model as it stands is a folder the driver can score (the last step's is the
    output itself); the driver's stop file ends the job after the step that reads it."""
    from jobs.unlearn.outputs import SNAPSHOT_MARKER, STOP_FILE, snapshot_dir

    s = spec(tiny_dir, tmp_path, eval_every=2, max_steps=5, report_interval_s=3600)
    batches = []
    final = run_unlearning(s, report=batches.append)
    rows = [r for b in batches for r in b]
    assert [r["step"] for r in rows if "snapshot" in r] == [2, 4]
    for step in (2, 4):
        folder = snapshot_dir(s.output_dir, step)
        assert json.loads((folder / SNAPSHOT_MARKER).read_text())["step"] == step
        assert load_model(folder) is not None and (folder / "tokenizer_config.json").exists()
    # a snapshot is the model at its step: step 2's forget NLL lies between the base's and the final model's
    base, two, last = (
        forget_nll(p, tiny_dir) for p in (tiny_dir / "model", snapshot_dir(s.output_dir, 2), s.output_dir)
    )
    assert base < two < last
    assert sum(r["step_tokens"] for r in rows) > 0 and final["params"] > 0 and final["step"] == 5

    out = tmp_path / "stopped"
    out.mkdir()
    (out / STOP_FILE).write_text("{}")
    final = run_unlearning(spec(tiny_dir, tmp_path, output_dir=str(out), max_steps=5))
    assert final["step"] == 1 and final["stopped_early"] == 1 and (out / JOB_MARKER).exists()


def test_a_job_restored_from_a_checkpoint_keeps_the_snapshots_it_wrote(tiny_dir, tmp_path, single_process_dist):
    """Ray Train's restart replays the steps after the checkpoint: a replayed step names the snapshot it
    wrote before and does not rewrite it (an eval task may be reading it)."""
    import shutil

    from jobs.unlearn.outputs import snapshot_dir

    s = spec(tiny_dir, tmp_path, eval_every=2, checkpoint_every=3, max_steps=5, report_interval_s=3600)
    saved = tmp_path / "ckpt"

    def keep(rows, checkpoint=None):
        if checkpoint is not None:
            shutil.copytree(checkpoint, saved, dirs_exist_ok=True)

    run_unlearning(s, report=keep)
    snaps = [snapshot_dir(s.output_dir, k) for k in (2, 4)]
    written = [(p / "model.safetensors").stat().st_mtime_ns for p in snaps]
    rows = []
    run_unlearning(s, report=lambda r, checkpoint=None: rows.extend(r), restore_from=str(saved))
    assert [r["step"] for r in rows] == [4, 5] and rows[0]["snapshot"] == str(snaps[1])
    assert [(p / "model.safetensors").stat().st_mtime_ns for p in snaps] == written


def test_a_deferred_retain_term_adds_up_to_the_eager_loss():
    """Inside terms_later a method's retain term is left for the loop (built after the rest is back-propagated);
    outside it is added at once: the same value either way."""
    from jobs.unlearn.methods.base import terms_later, with_retain

    calls = []
    model = lambda input_ids, attention_mask: type("O", (), {"logits": torch.zeros(1, 3, 5)})()  # noqa: E731
    retain = {
        "input_ids": torch.ones(1, 3, dtype=torch.long),
        "attention_mask": torch.ones(1, 3),
        "labels": torch.tensor([[-100, 1, 2]]),
    }
    forget_term = torch.tensor(2.0)
    metrics = {}
    eager = with_retain(model, {"retain": retain}, forget_term, metrics, alpha=0.5)
    assert eager.item() == pytest.approx(2.0 + 0.5 * math.log(5)) and "retain_loss" in metrics
    metrics = {}
    with terms_later() as later:
        first = with_retain(model, {"retain": retain}, forget_term, metrics, alpha=0.5)
    assert first is forget_term and len(later) == 1 and "retain_loss" not in metrics
    assert (first + later[0]()).item() == pytest.approx(eager.item()) and "retain_loss" in metrics
    with terms_later(enabled=False) as later:
        assert with_retain(model, {"retain": retain}, forget_term, {}, alpha=0.5).item() == eager.item()
    assert later == [] and not calls


@pytest.mark.parametrize("method", ["npo", "grad_diff", "ga_kl"])
def test_zero3_back_propagating_terms_one_at_a_time_trains_as_stage_0(tiny_dir, tmp_path, single_process_dist, method):
    """Under ZeRO-3 the loop back-propagates a method's retain term after the rest (one graph at a time, so each
    layer is released after its backward); the losses of the steps and the model equal stage 0's, where the sum
    is back-propagated at once."""
    rows = {}
    for stage in (0, 3):
        out = []
        run_unlearning(
            spec(
                tiny_dir,
                tmp_path,
                method=method,
                deepspeed={"zero_optimization": {"stage": stage}},
                output_dir=str(tmp_path / f"z{stage}"),
                max_steps=4,
                report_interval_s=0,
                gradient_accumulation_steps=2,
                batch_size=2,
            ),
            report=lambda r, checkpoint=None, out=out: out.extend(r),
        )
        rows[stage] = out
    for a, b in zip(rows[0], rows[3]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["retain_loss"] == pytest.approx(b["retain_loss"], rel=1e-4)
    assert rows[3][-1]["loss"] != pytest.approx(rows[3][0]["loss"], rel=1e-3)
    assert forget_nll(tmp_path / "z0", tiny_dir) == pytest.approx(forget_nll(tmp_path / "z3", tiny_dir), rel=1e-4)
