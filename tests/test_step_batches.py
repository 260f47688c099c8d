"""What each worker trains on at each step (jobs/unlearn/data.py): the split of a global batch, a data order that
depends on the seed and not on the worker count, and token means that are the global batch's."""

import pytest
import torch

from jobs.data.format import IGNORE_INDEX
from jobs.unlearn.data import BatchSplitError, StepBatches, split_batch
from jobs.unlearn.methods.base import mean_nll


def test_a_global_batch_splits_into_micro_batches_and_accumulation_per_worker():
    assert split_batch(4, 3, None, 2) == (4, 3)  # no global batch: as configured, the global batch grows
    assert split_batch(4, 1, 8, 1) == (4, 2) and split_batch(4, 1, 8, 2) == (4, 1) and split_batch(4, 1, 8, 4) == (2, 1)
    assert split_batch(4, 1, 12, 2) == (3, 2)  # 6 rows a worker: the largest micro batch <= 4 that divides 6
    assert split_batch(8, 1, 14, 2) == (7, 1)
    with pytest.raises(BatchSplitError, match=r"^unlearn.global_batch_size: 9 rows do not split evenly over 2"):
        split_batch(4, 1, 9, 2)
    with pytest.raises(BatchSplitError, match=r"^unlearn.gradient_accumulation_steps: set it or"):
        split_batch(4, 2, 8, 2)


def rows(n: int, key: str = "forget") -> list[dict]:
    """Row i: 2 + i % 5 tokens (of 16), all targets; its id is its first token."""
    seq = lambda i: [i] + [(3 * i + j) % 16 for j in range(1 + i % 5)]  # noqa: E731
    return [{key: {"input_ids": seq(i), "labels": seq(i)}} for i in range(n)]


def ids(batch: dict, key: str = "forget") -> list[int]:
    return batch[key]["input_ids"][:, 0].tolist()


@pytest.mark.parametrize("micro,accum,world", [(8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4)])
def test_every_split_of_a_global_batch_sees_the_same_rows_in_the_same_steps(micro, accum, world):
    reference = StepBatches(rows(11), rows(7, "retain"), seed=5, micro=8, accum=1, rank=0, world=1, pad_token_id=0)
    for step in (1, 2, 3, 7):  # 11 rows, 8 a step: steps cross epochs
        want = ids(reference.micro_batches(step)[0])
        got, got_retain = [], []
        for rank in range(world):
            data = StepBatches(
                rows(11), rows(7, "retain"), seed=5, micro=micro, accum=accum, rank=rank, world=world, pad_token_id=0
            )
            for b in data.micro_batches(step):
                got += ids(b)
                got_retain += ids(b, "retain")
        assert got == want  # rank r takes slice r of the global batch: disjoint, and together the whole of it
        assert got_retain == ids(reference.micro_batches(step)[0], "retain")
    # every epoch is a permutation of all rows, drawn from the seed
    stream = [i for s in range(1, 12) for i in ids(reference.micro_batches(s)[0])]
    assert sorted(stream[:11]) == list(range(11)) and stream[:11] != stream[11:22]
    assert reference.epoch(1) == 0 and reference.epoch(2) == 1  # rows 8-15: the last one is in epoch 1
    other = StepBatches(rows(11), None, seed=6, micro=8, accum=1, rank=0, world=1, pad_token_id=0)
    assert ids(other.micro_batches(1)[0]) != ids(reference.micro_batches(1)[0])


class Unigram(torch.nn.Module):
    """A model whose logits do not depend on the context: NLL sums are easy to compute by hand."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.logits.expand(*input_ids.shape, -1)})()


@pytest.mark.parametrize("micro,accum,world", [(2, 4, 1), (4, 1, 2), (1, 2, 4)])
def test_token_means_averaged_over_micro_batches_and_workers_are_the_global_batchs(micro, accum, world):
    """Rows of 2 to 6 tokens: a plain mean of per-micro-batch token means is not the token mean of the global
    batch; with the loop's ``norm`` the mean over micro batches and workers (what DeepSpeed's gradient averaging
    and the loop's logged value take) is exactly it."""
    model = Unigram()
    data = [
        StepBatches(rows(8), None, seed=1, micro=micro, accum=accum, rank=r, world=world, pad_token_id=0)
        for r in range(world)
    ]
    parts = [b["forget"] for d in data for b in d.micro_batches(1)]
    logp = torch.log_softmax(model.logits.detach(), -1)
    targets = [
        t for p in parts for seq, lab in zip(p["input_ids"], p["labels"]) for t in lab[1:].tolist() if t != IGNORE_INDEX
    ]
    want = -sum(logp[t].item() for t in targets) / len(targets)
    with torch.no_grad():
        normed = sum(mean_nll(model, p).item() for p in parts) / len(parts)
        plain = sum(mean_nll(model, {k: v for k, v in p.items() if k != "norm"}).item() for p in parts) / len(parts)
    assert normed == pytest.approx(want, rel=1e-6)
    assert plain != pytest.approx(want, rel=1e-3)
