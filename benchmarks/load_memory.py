"""Each rank's memory while a ZeRO-3 job sets up, at 2 gloo ranks on the CPU: does any rank hold a whole copy?

A randomly initialised Llama with TinyLlama-1.1B's shape (1.1B parameters; bf16 shards of 500 MB, built once
into ``--cache``) and a 2-layer toy Llama with the same tokenizer are each loaded by the job's own code:
``jobs.unlearn.loop.run_unlearning`` (NPO, fp32, ZeRO-3) in 2 processes that form one gloo group
(``jobs.unlearn.solo.spawn_ranks``), once with LoRA (the reference is the model with its adapter off) and once
as a full fine-tune with its full reference model. A thread in each rank samples its anonymous RSS
(``RssAnon`` of /proc/self/status, every 2 ms) and keeps the peak of each phase, which the job's own functions
delimit (wrapped, not replaced):

- ``load``: ``load_trained`` (the trained model, created partitioned);
- ``initialize``: the trained model's ``deepspeed.initialize`` (ZeRO-3's partitions of what trains);
- ``reference``: ``reference_model`` (a second partitioned engine, or nothing with LoRA).

Each case runs with spunge's loader and, for comparison in the same run, with transformers' ZeRO-3 loading and
with the whole-model loading spunge did before (``--loaders``; ``use_loader``).

The job stops there (on every rank): the first step's optimizer states, activations and the parameters
DeepSpeed keeps gathered (``stage3_max_live_parameters``) are training, not loading.

A phase's figure is the big model's peak minus the toy model's at the same phase (what the same code costs
without a model: imports, process group, buffers), as a ratio to the model's fp32 bytes (4 x parameters), and
its increase over what the phase before left held. Sharding over 2 ranks puts about 0.5 of a model on each
rank: the load and the reference should each add about 0.5, LoRA's initialize nothing. A full fine-tune's
initialize adds ZeRO-3's training partitions of the trainable parameters (fp32 master weights and gradients:
2 x 4 Psi / N, 1.0 at N = 2), which a loader cannot remove. File-backed pages (the checkpoint rank 0 maps while
it reads) are page cache, not the process's memory: reported apart (``RssFile``), not counted.

    python benchmarks/load_memory.py [--cache ~/.cache/spunge] [--json benchmarks/results/load_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

PHASES = ["load", "initialize", "reference"]
TINYLLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
TOY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
GOAL = 0.6


def qa_rows(n: int = 16) -> list[dict]:
    return [
        {"question": f"Where was author {i} born?", "answer": f"Author {i} was born in town {i % 7}."} for i in range(n)
    ]


def build(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A randomly initialised Llama of ``shape`` in bf16 safetensors shards of 500 MB, with a small BPE tokenizer
    and QA rows, written once (``spunge_bench.json`` marks a finished folder)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from jobs.data.io import write_jsonl
    from jobs.models import save_model

    marker = folder / "spunge_bench.json"
    stamp = {"shape": shape, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return folder
    rows = qa_rows()
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        [r["question"] + " " + r["answer"] for r in rows],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        **shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    save_model(model, tok, folder / "model", max_shard_size="500MB")
    write_jsonl(folder / "forget.jsonl", rows[:8])
    write_jsonl(folder / "retain.jsonl", rows[8:])
    marker.write_text(json.dumps(stamp))
    return folder


class Sampler(threading.Thread):
    """This process's RssAnon and RssFile every ``interval`` s; the peak of each named phase."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.phase, self.running = interval, None, True
        self.peaks: dict[str, dict[str, int]] = {}
        self.ends: dict[str, dict[str, int]] = {}
        self.at_start = self.read()

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def sample(self) -> None:
        now, phase = self.read(), self.phase
        if phase is not None:
            peak = self.peaks.setdefault(phase, {"RssAnon": 0, "RssFile": 0})
            for k, v in now.items():
                peak[k] = max(peak[k], v)

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(self.interval)

    def during(self, phase: str, fn):
        """``fn`` wrapped so that its call is ``phase`` (unless a phase is already running: nested calls)."""

        def wrapped(*args, **kwargs):
            if self.phase is not None:
                return fn(*args, **kwargs)
            self.sample()
            self.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.sample()
                self.ends[phase] = self.read()
                self.phase = None

        return wrapped


class SetUpDone(Exception):
    """Raised on every rank once the job's models are set up: what comes after (the optimizer's states, the
    activations, the gathered parameters DeepSpeed keeps live for a step) is not loading."""


def use_loader(loader: str) -> None:
    """Make the job load its models with ``loader``: ``slices`` (spunge's, each rank reads its partition),
    ``transformers`` (``from_pretrained`` under HfDeepSpeedConfig: rank 0 reads, each module is gathered) or
    ``whole`` (plain ``from_pretrained`` on every rank, partitioned by ``deepspeed.initialize``: spunge before
    issue 30)."""
    if loader == "slices":
        return
    import contextlib

    import jobs.unlearn.reference as reference
    from jobs.models import load_model
    from jobs.unlearn.partitioned import zero3_init

    def load_for_job(path, spec, ds_config):
        with zero3_init(ds_config) if loader == "transformers" else contextlib.nullcontext():
            return load_model(path, spec.dtype, spec.allow_pickle, spec.attn_implementation)

    reference.load_for_job = load_for_job


def measure(rank: int, world: int, spec: dict, loader: str = "slices") -> dict:
    """One rank of the job up to its first step, its phases delimited by wrapping the job's own functions."""
    import deepspeed

    import jobs.unlearn.loop as loop
    import jobs.unlearn.worker as worker  # the loop's set-up, whose own functions are wrapped
    from jobs.spec import UnlearnSpec

    use_loader(loader)
    sampler = Sampler()
    worker.load_trained = sampler.during("load", worker.load_trained)
    deepspeed.initialize = sampler.during("initialize", deepspeed.initialize)
    reference = sampler.during("reference", worker.reference_model)

    def reference_then_stop(*args, **kwargs):
        reference(*args, **kwargs)
        raise SetUpDone

    worker.reference_model = reference_then_stop
    sampler.start()
    try:
        loop.run_unlearning(UnlearnSpec(**spec))
    except SetUpDone:
        pass
    finally:
        sampler.running = False
        sampler.join()
    return {"rank": rank, "at_start": sampler.at_start, "peaks": sampler.peaks, "ends": sampler.ends}


def run_case(folder: Path, lora: bool, out: Path, threads: int, loader: str = "slices") -> list[dict]:
    from jobs.unlearn.solo import spawn_ranks

    spec = dict(
        name="bench/load",
        model_path=str(folder / "model"),
        forget_path=str(folder / "forget.jsonl"),
        retain_path=str(folder / "retain.jsonl"),
        method="npo",
        max_steps=1,
        batch_size=2,
        max_length=32,
        report_interval_s=3600,
        threads_per_worker=threads,
        output_dir=str(out),
        deepspeed={"zero_optimization": {"stage": 3}},
        lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]} if lora else None,
    )
    return spawn_ranks(measure, 2, spec, loader, timeout=3600)


def parameter_count(folder: Path) -> int:
    from jobs.shards import folder_tensors

    total = 0
    for _, shape in folder_tensors(folder).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path(os.environ.get("SPUNGE_CACHE", Path.home() / ".cache" / "spunge"))))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--json", default=str(ROOT / "results" / "load_memory.json"))
    ap.add_argument(
        "--loaders",
        nargs="+",
        default=["slices", "transformers", "whole"],
        choices=["slices", "transformers", "whole"],
        help="how the job loads its models (use_loader); whole runs the LoRA case only",
    )
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cache = Path(args.cache)
    t0 = time.perf_counter()
    big = build(cache / "bench-tinyllama-1.1b-random", TINYLLAMA)
    toy = build(cache / "bench-toy-llama", TOY)
    build_s = time.perf_counter() - t0
    n = parameter_count(big / "model")
    model_bytes = 4 * n
    results = {
        "model": "random Llama, TinyLlama-1.1B's shape, bf16 shards of 500 MB, trained in fp32",
        "parameters": n,
        "model_bytes": model_bytes,
        "ranks": 2,
        "zero_stage": 3,
        "method": "npo",
        "goal": GOAL,
        "build_s": round(build_s, 1),
        "loaders": {
            "slices": "spunge's: each rank reads its partition from the files (jobs.unlearn.partitioned)",
            "transformers": "from_pretrained under HfDeepSpeedConfig: rank 0 reads, every module gathered",
            "whole": "plain from_pretrained on every rank, partitioned by deepspeed.initialize (before)",
        },
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cases = [
            (f"{kind}, {loader}", lora, loader)
            for loader in args.loaders
            for kind, lora in (("lora", True), ("full reference", False))
            if not (loader == "whole" and not lora)
        ]  # two whole models per rank: more than 24 GiB for 2 ranks
        for case, lora, loader in cases:
            ranks = {
                name: run_case(folder, lora, Path(tmp) / f"{case}-{name}", args.threads, loader)
                for name, folder in (("toy", toy), ("big", big))
            }
            rows = []
            for r in range(2):
                b, t = ranks["big"][r]["peaks"], ranks["toy"][r]["peaks"]
                row = {"rank": r}
                held_before = 0.0
                for phase in PHASES:
                    if phase in b and phase in t:
                        above = b[phase]["RssAnon"] - t[phase]["RssAnon"]
                        held = ranks["big"][r]["ends"][phase]["RssAnon"] - ranks["toy"][r]["ends"][phase]["RssAnon"]
                        row[phase] = {
                            "peak_anon_mb": round(b[phase]["RssAnon"] / 2**20),
                            "toy_peak_anon_mb": round(t[phase]["RssAnon"] / 2**20),
                            "ratio": round(above / model_bytes, 3),
                            "held_after_ratio": round(held / model_bytes, 3),
                            "increase_ratio": round(above / model_bytes - held_before, 3),
                            "peak_file_mb": round(b[phase]["RssFile"] / 2**20),
                        }
                        held_before = held / model_bytes
                rows.append(row)
            results["cases"][case] = rows
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"{n / 1e9:.2f}B parameters, {model_bytes / 2**30:.2f} GiB in fp32; ratio = (peak anon RSS - toy's) / "
        f"model bytes, goal <= {GOAL} at load, initialize and reference"
    )
    print(f"| case | rank | {' | '.join(f'{p}: peak (+ over the phase before)' for p in PHASES)} |")
    print("|---|---|" + "---|" * len(PHASES))
    for case, rows in results["cases"].items():
        for row in rows:
            cells = [f"{row[p]['ratio']:.2f} (+{row[p]['increase_ratio']:.2f})" if p in row else "-" for p in PHASES]
            print(f"| {case} | {row['rank']} | {' | '.join(cells)} |")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
