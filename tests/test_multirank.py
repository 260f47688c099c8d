"""ZeRO-3 at its smallest honest size: two gloo ranks in two fresh processes (``spawn_ranks``, what a Ray Train job's
workers are, without Ray), running the real loop on a base model stored in shards. One spawn runs every job
below in turn (each process imports torch, transformers and DeepSpeed once); the tests read what it returned
and wrote. The same jobs at one rank run in this process (``single_process_dist``)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from jobs.data.format import collate, encode_qa
from jobs.data.io import load_jsonl
from jobs.models import load_model, load_tokenizer, save_model
from jobs.shards import WEIGHTS_INDEX_NAME, weight_files
from jobs.spec import UnlearnSpec
from jobs.unlearn.solo import spawn_ranks

SHARD = "60KB"  # the tiny model is ~190 KB: several shards, in and out
BATCH_JOB = dict(method="npo", global_batch_size=8, batch_size=4, max_steps=10, optimizer={"lr": 3e-3}, seed=3)


def job(root: Path, name: str, **kw) -> UnlearnSpec:
    base = dict(
        name=name,
        model_path=str(root / "base"),
        forget_path=str(root / "forget.jsonl"),
        retain_path=str(root / "retain.jsonl"),
        method="npo",
        optimizer={"lr": 3e-3},
        max_steps=2,
        batch_size=2,
        report_interval_s=0,
        max_shard_size=SHARD,
        output_dir=str(root / "out" / name),
        deepspeed={"zero_optimization": {"stage": 3}},
    )
    return UnlearnSpec(**{**base, **kw})


def zero(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}}


def read_partitions_both_ways(root: Path) -> dict:
    """This rank's partitions of the base as ``load_partitioned`` reads them from the files, and as
    transformers' own ZeRO-3 loading (rank 0 reads, every layer gathered) leaves them."""
    from jobs.unlearn.engine import deepspeed_config, import_deepspeed
    from jobs.unlearn.partitioned import load_partitioned, slice_reason, zero3_init

    import_deepspeed().init_distributed(dist_backend="gloo")  # DeepSpeed's view of the group spawn_ranks made
    ds = deepspeed_config(job(root, "probe"), torch.distributed.get_world_size())
    sliced = load_partitioned(str(root / "base"), "float32", ds)
    with zero3_init(ds):
        gathered = load_model(root / "base")
    valid = (
        lambda p: p.ds_tensor[
            : max(
                0,
                min(
                    p.ds_tensor.ds_numel,  # noqa: E731 (the padding is undefined)
                    p.ds_numel - p.ds_tensor.ds_numel * torch.distributed.get_rank(),
                ),
            )
        ]
    )
    pairs = list(zip(sliced.named_parameters(), gathered.named_parameters()))
    return {
        "reason": slice_reason(str(root / "base"), ds),
        "names": all(a[0] == b[0] for a, b in pairs),
        "equal": all(torch.equal(valid(a[1]), valid(b[1])) for a, b in pairs),
        "elements": sum(a[1].ds_tensor.numel() for a, _ in pairs),
        "whole": sum(a[1].ds_numel for a, _ in pairs),
    }


def jobs_on_every_rank(rank: int, world: int, root: str) -> dict:
    """Every multi-rank job, on each rank; returns the rows each reported (every rank's must be the same)."""
    from jobs.unlearn.loop import run_unlearning

    root = Path(root)
    rows: dict[str, list] = {}

    def run(spec: UnlearnSpec, **kw) -> None:
        run_unlearning(spec, report=lambda r, checkpoint=None: rows.setdefault(spec.name, []).extend(r), **kw)

    run(job(root, "npo", method_params={"beta": 0.1}))
    lr0 = job(root, "lr0", method="grad_diff")
    run(lr0.model_copy(update={"optimizer": lr0.optimizer.model_copy(update={"lr": 0.0})}))
    run(job(root, "lora", lora={"r": 4, "alpha": 8}))
    run(job(root, "tvn", method="tvn", method_params={"lam": 1.0}))
    reinforced = root / "out" / "whp" / "reinforced"
    run(
        job(
            root,
            "whp/reinforced",
            method="whp",
            method_params={"phase": "reinforce"},
            retain_path=None,
            output_dir=str(reinforced),
        )
    )
    run(job(root, "whp", method="whp", method_params={"reinforced": str(reinforced)}))
    run(
        job(
            root,
            "localize",
            method="grad_diff",
            optimizer={"lr": 1e-2, "weight_decay": 0.1},
            localize={"attribution": "gradient", "fraction": 0.05, "scope": "mlp"},
        )
    )

    saved = root / "checkpoint"

    def keep(r: list, checkpoint=None) -> None:  # every rank's part into one folder, as Ray Train gathers them
        rows.setdefault("restore/first", []).extend(r)
        if checkpoint is not None and r[-1]["step"] == 2:
            shutil.copytree(checkpoint, saved, dirs_exist_ok=True)

    restore = job(root, "restore", max_steps=4, checkpoint_every=2)
    run_unlearning(restore, report=keep)
    torch.distributed.barrier()
    run(restore.model_copy(update={"name": "restore/again"}), restore_from=str(saved))

    for stage in (0, 3):
        run(job(root, f"batch/zero{stage}", deepspeed=zero(stage), **BATCH_JOB))
    rows["partitions"] = [read_partitions_both_ways(root)]
    return rows


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    """(root, rank 0's rows, rank 1's rows) after every job ran at two ranks on a base stored in shards."""
    root = tmp_path_factory.mktemp("two-ranks")
    save_model(load_model(tiny_dir / "model"), load_tokenizer(tiny_dir / "model"), root / "base", max_shard_size=SHARD)
    for name in ("forget.jsonl", "retain.jsonl"):
        shutil.copy(tiny_dir / name, root / name)
    rank0, rank1 = spawn_ranks(jobs_on_every_rank, 2, str(root), timeout=900)
    return root, rank0, rank1


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        out.update(load_file(file))
    return out


def forget_prob(folder: Path, rows_file: Path) -> float:
    """Mean over forget rows of the per-token answer probability, exp(-mean NLL) (the qa suite's forget_prob)."""
    tok, model = load_tokenizer(folder), load_model(folder)
    batch = collate([encode_qa(tok, r["question"], r["answer"]) for r in load_jsonl(rows_file)], tok.pad_token_id)
    from jobs.data.format import sequence_nll

    with torch.no_grad():
        nll, n = sequence_nll(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
    return torch.exp(-nll / n).mean().item()


def test_the_base_really_is_sharded(two_ranks):
    root, _, _ = two_ranks
    assert (root / "base" / WEIGHTS_INDEX_NAME).exists() and len(weight_files(root / "base")) > 2


def test_each_rank_reads_its_own_slice_of_the_checkpoint_as_transformers_would_place_it(two_ranks):
    """load_partitioned fills each rank's ZeRO-3 partition from the files directly; the partitions equal those
    transformers' own ZeRO-3 loading leaves, and a rank holds half the model."""
    _, rank0, rank1 = two_ranks
    for probe in (rank0["partitions"][0], rank1["partitions"][0]):
        assert probe["reason"] is None and probe["names"] and probe["equal"]
        assert probe["elements"] <= probe["whole"] / 2 + 64


def test_every_rank_logs_the_same_rows(two_ranks):
    """The logged loss and metrics are the global batch's, reduced over ranks: rank 1's rows are rank 0's."""
    _, rank0, rank1 = two_ranks
    for name in set(rank0) - {"partitions"}:
        keep = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]
        assert keep(rank0[name]) == keep(rank1[name]), name


def test_npo_first_step_forget_term_is_2_over_beta_ln2_with_the_sharded_reference(two_ranks):
    """At step 1 the model is the reference: log_ratio is 0 on every row, so the NPO term is -(2/beta) log
    sigmoid(0) = (2/beta) ln 2 exactly when both sharded copies compute the same log-probabilities."""
    _, rank0, _ = two_ranks
    first = rank0["npo"][0]
    assert first["step"] == 1 and first["npo_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)
    assert rank0["npo"][1]["npo_loss"] != pytest.approx(first["npo_loss"], rel=1e-6)  # then it moves


def test_a_job_at_lr_0_saves_the_base_bit_for_bit_at_full_shapes_in_shards(two_ranks):
    root, _, _ = two_ranks
    out = root / "out" / "lr0"
    assert (out / WEIGHTS_INDEX_NAME).exists() and len(weight_files(out)) > 2
    base, saved = weights(root / "base"), weights(out)
    assert set(saved) == set(base)
    for name, tensor in base.items():
        assert saved[name].shape == tensor.shape and torch.equal(saved[name], tensor), name
    assert load_model(out) is not None


def test_lora_adapters_are_saved_at_full_shapes(two_ranks):
    from safetensors.torch import load_file

    root, rank0, _ = two_ranks
    adapter = load_file(root / "out" / "lora" / "adapter_model.safetensors")
    config = json.loads((root / "base" / "config.json").read_text())
    hidden = config["hidden_size"]
    q_a = next(v for k, v in adapter.items() if "q_proj.lora_A" in k)
    q_b = next(v for k, v in adapter.items() if "q_proj.lora_B" in k)
    assert q_a.shape == (4, hidden) and q_b.shape == (hidden, 4)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    assert rank0["lora"][0]["npo_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)  # default beta 0.1


def test_tvn_finalizes_tensor_by_tensor_without_hanging(two_ranks):
    """tvn's output is base - lam (trained - base), written tensor by tensor from the gathered weights."""
    root, _, _ = two_ranks
    out = root / "out" / "tvn"
    base, trained, final = weights(root / "base"), weights(out / "trained"), weights(out)
    assert (out / WEIGHTS_INDEX_NAME).exists() and set(final) == set(base) == set(trained)
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    for k in base:
        assert torch.allclose(final[k], base[k] - (trained[k] - base[k]), atol=1e-6), k


def test_whp_with_its_sharded_reinforced_model_does_not_hang(two_ranks):
    root, rank0, _ = two_ranks
    assert (root / "out" / "whp" / "spunge_job.json").exists()
    assert [r["step"] for r in rank0["whp"]] == [1, 2] and all(math.isfinite(r["loss"]) for r in rank0["whp"])


def test_localize_under_zero3_at_two_ranks_changes_nothing_outside_the_mask(two_ranks):
    root, rank0, _ = two_ranks
    before, after = weights(root / "base"), weights(root / "out" / "localize")
    mlp = [n for n in before if ".mlp." in n and before[n].dim() == 2]
    budget = round(0.05 * sum(before[n].numel() for n in mlp))
    assert rank0["localize"][0]["localize/kept"] == budget
    for name, w in before.items():
        if name not in mlp:
            assert torch.equal(after[name], w), name
    assert 0 < sum(int((after[n] != before[n]).sum()) for n in mlp) <= budget


def test_a_zero3_job_restored_from_its_checkpoint_continues_with_the_same_losses(two_ranks):
    _, rank0, _ = two_ranks
    first = {r["step"]: r for r in rank0["restore/first"]}
    again = rank0["restore/again"]
    assert [r["step"] for r in again] == [3, 4] and all(r["resumed_from"] == 2 for r in again)
    for r in again:
        assert r["loss"] == pytest.approx(first[r["step"]]["loss"], rel=1e-6)
        assert r["forget_loss"] == pytest.approx(first[r["step"]]["forget_loss"], rel=1e-6)


@pytest.mark.parametrize("stage", [0, 3])
def test_one_and_two_workers_give_the_same_losses_and_model(two_ranks, tmp_path, single_process_dist, stage):
    """unlearn.global_batch_size fixes the rows of a step: one worker (micro 4 x 2 accumulation) and two workers
    (micro 4 each) train on the same global batches, log the same losses and save the same model."""
    from jobs.unlearn.loop import run_unlearning

    root, rank0, _ = two_ranks
    one = []
    spec = job(root, f"batch/zero{stage}", deepspeed=zero(stage), output_dir=str(tmp_path / "one"), **BATCH_JOB)
    run_unlearning(spec, report=lambda r, checkpoint=None: one.extend(r))
    two = rank0[f"batch/zero{stage}"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 11))
    for a, b in zip(one, two):
        for key in ("loss", "forget_loss", "npo_loss", "retain_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (a["step"], key)
        assert a["step_tokens"] == b["step_tokens"]
    assert one[-1]["loss"] != pytest.approx(one[0]["loss"], rel=1e-2)  # it trained
    p_one, p_two = (forget_prob(f, root / "forget.jsonl") for f in (tmp_path / "one", root / "out" / spec.name))
    assert p_one == pytest.approx(p_two, abs=1e-3)
    assert p_one != pytest.approx(forget_prob(root / "base", root / "forget.jsonl"), abs=1e-3)
