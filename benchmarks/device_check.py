"""GPU device check: spunge's worker code (``jobs/``) on one GPU, without Ray, in a few minutes.

Each case runs in its own fresh process (``jobs.unlearn.solo.spawn_ranks``, one rank: NCCL on the GPU, gloo on
the CPU) under its own time limit; a case that fails or runs out of time prints its error and the rest still
run. The cases:

- ``build``: randomly initialised Llamas from their configs, saved as bf16 safetensors with a small BPE
  tokenizer (no download): SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 K/V heads, MLP 1536,
  vocabulary 49152, tied embeddings) and TinyLlama-1.1B's (hidden 2048, 22 layers, 32 heads, 4 K/V heads,
  MLP 5632, vocabulary 32000); QA rows whose answers fill every sequence; two fine-tuned-looking copies of
  the merge model (base + N(0, 1e-3^2) per element).
- ``spunge/<model>/zero<2|3>``: one unlearning job through the loop the pipeline runs
  (``jobs.unlearn.loop.run_unlearning``: DeepSpeed ZeRO stage 2 or 3 on one rank, bf16, gradient
  checkpointing, sdpa attention, NPO with LoRA on every linear layer, the reference being the adapter
  switched off). Steady tokens/s from the job's own step rows after ``--warmup`` steps (as
  ``train_overhead.py``): the tokens of every batch a step reads, forget and retain. Peak GPU memory
  (``torch.cuda.max_memory_allocated``): through set-up and the first step, then of the steps after it.
- ``bare/<model>``: the same model, LoRA, batches (``jobs.unlearn.data.StepBatches``), method object and
  gradient checkpointing / sdpa in a plain torch loop: bf16 weights and adapters, torch AdamW,
  ``clip_grad_norm_`` at 1.0, one host read of the loss per step; no DeepSpeed.
- ``eval/<model>``: ``jobs.evaluate.evaluate_model`` on the saved model folder with the ``qa`` suite (answer
  scoring, perturbed answers, greedy generation, ROUGE-L) on small forget and retain files, bf16, sdpa.
- ``merge/<model>``: ``jobs.merge.merge_models`` TIES (density 0.5, the project's defaults) of the two copies
  onto the base, which takes the streaming engine (``jobs/merge_stream.py``, CPU); the output must load
  and run a forward pass, and hold the base's tensor names.

Reported per model and ZeRO stage: tokens/s of spunge and of the bare loop and their ratio; model FLOPs
utilisation, 6 N tokens/s over the GPU's dense bf16 peak (N: the base model's parameters; both loops are
counted alike, so the MFU ratio is the tokens/s ratio; the table ``PEAK_BF16_TFLOPS``, or ``--peak-tflops``);
peak GPU memory against ``jobs.planning.memory``'s estimate (docs/scaling.md's formulas) for the
same job (one GPU, LoRA, checkpointing, sdpa, the loop's ZeRO-3 bucket sizes; at ZeRO-3 the loop builds the
retain graph after the forget graph's backward, ``terms_later``: one graph alive at a time).

Nothing on its path may import ray, mlflow or datasets: every case reports the modules it holds at its end,
and any of those fails the check. Prints a table and writes ``<out>/device_check.json``; exit code 1 when a
check fails, 2 without CUDA (unless ``--cpu``).

    python benchmarks/device_check.py [--out device-check] [--models smollm2 llama-1b] [--zero 2 3]
    python benchmarks/device_check.py --cpu      # the same code paths on the CPU, tiny models (tens of seconds)

On the GPU machine, with the wheels of ``benchmarks/device_bundle.sh`` carried as ``.whl``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 benchmarks/device_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from jobs.data.tiny import AUTHORS, TOWNS, train_tokenizer
from jobs.planning.memory import JobSetup, ModelShape, estimate, llama_param_count

FORBIDDEN = ("ray", "mlflow", "datasets")
GiB = 2**30

# Llama configurations with random weights: the real shapes, and tiny ones of the same kinds for --cpu
SHAPES = {
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    ),
}
TINY_SHAPES = {
    "smollm2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
    "llama-1b": dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=1024,
        tie_word_embeddings=False,
        max_position_embeddings=512,
    ),
}
# per model on the GPU: (micro batch, sequence length); --cpu: 4 x 64
GPU_BATCH = {"smollm2": (16, 512), "llama-1b": (8, 512)}

# dense bf16 tensor-core peak in TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name(): the
# first match wins ("NVIDIA H100 80GB HBM3" is the SXM part)
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU from its name (``PEAK_BF16_TFLOPS``), None when the table lacks it."""
    return next((t for key, t in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


# --------------------------------------------------------------------------------------------- inputs


def train_rows(n: int, offset: int, sentences: int) -> list[dict]:
    """QA rows whose answers run to ``sentences`` sentences (long enough to be cut at any sequence length)."""
    rows = []
    for i in range(offset, offset + n):
        name = AUTHORS[i % len(AUTHORS)]
        answer = " ".join(f"{name} was born in {TOWNS[(i + k) % len(TOWNS)]}." for k in range(sentences))
        rows.append({"question": f"Where was {name} born ({i})?", "answer": answer})
    return rows


def eval_rows(n: int, offset: int) -> list[dict]:
    """TOFU-shaped rows (answer, paraphrase, three perturbed answers): every path of the qa suite."""
    rows = []
    for i in range(offset, offset + n):
        name, town = AUTHORS[i % len(AUTHORS)], TOWNS[i % len(TOWNS)]
        rows.append(
            {
                "question": f"Where was {name} born ({i})?",
                "answer": f"{name} was born in {town}.",
                "paraphrased_answer": f"It was in {town} that {name} was born.",
                "perturbed_answers": [f"{name} was born in {TOWNS[(i + k) % len(TOWNS)]}." for k in (1, 2, 3)],
            }
        )
    return rows


def perturbed_copy(base: Path, out: Path, seed: int, std: float = 1e-3) -> None:
    """``base`` + N(0, std^2) per element of every floating tensor, in the same files and dtypes; the side files
    (config, tokenizer, shard index) copied."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(base.iterdir()):
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            for name, t in tensors.items():
                if t.is_floating_point():
                    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std)
                    tensors[name] = (t.float() + noise).to(t.dtype)
            save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        elif f.is_file():
            shutil.copy2(f, out / f.name)


def case_build(a: dict) -> dict:
    """The models, the data and the merge inputs, in ``a["work"]``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.data.io import write_jsonl
    from jobs.models import save_model
    from jobs.unlearn.engine import import_deepspeed

    # save_pretrained imports deepspeed where it is installed (accelerate's extract_model_from_parallel), and
    # deepspeed's autotuner then imports mlflow where that is installed; the loop's own import keeps mlflow out
    import_deepspeed()
    work = Path(a["work"])
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    forget, retain = train_rows(a["rows"], 0, a["sentences"]), train_rows(a["rows"], a["rows"], a["sentences"])
    write_jsonl(data / "forget.jsonl", forget)
    write_jsonl(data / "retain.jsonl", retain)
    write_jsonl(data / "eval_forget.jsonl", eval_rows(a["eval_rows"], 0))
    write_jsonl(data / "eval_retain.jsonl", eval_rows(a["eval_rows"], a["eval_rows"]))
    tok = train_tokenizer(
        [r["question"] + " " + r["answer"] for r in forget[:16]]
        + [f"It was in {t} that {n} was born." for n in AUTHORS for t in TOWNS],
        vocab_size=500,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict[str, Any] = {"models": {}}
    for name in a["models"]:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        config = LlamaConfig(
            **a["shapes"][name],
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        with torch.device(device):  # random init on the GPU: seconds rather than a minute for 1.1B
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        save_model(model, tok, work / "models" / name)
        del model
        out["models"][name] = {"params": params, "seconds": round(time.perf_counter() - t0, 1)}
    if a.get("merge_model"):
        t0 = time.perf_counter()
        for i in (1, 2):
            perturbed_copy(work / "models" / a["merge_model"], work / "merge_inputs" / f"ft{i}", seed=i)
        out["merge_inputs_s"] = round(time.perf_counter() - t0, 1)
    return out


# --------------------------------------------------------------------------------------------- training


def job_spec(a: dict, out: Path, zero: Optional[int]):
    from jobs.spec import UnlearnSpec

    data = Path(a["work"]) / "data"
    ds: dict[str, Any] = {"zero_optimization": {"stage": zero if zero is not None else 0}}
    return UnlearnSpec(
        name=f"device-check/{a['model']}",
        model_path=str(Path(a["work"]) / "models" / a["model"]),
        forget_path=str(data / "forget.jsonl"),
        retain_path=str(data / "retain.jsonl"),
        method=a["method"],
        optimizer={"name": "adamw", "lr": 1e-4},
        max_steps=a["warmup"] + a["steps"],
        batch_size=a["batch"],
        max_length=a["seq"],
        dtype=a["dtype"],
        attn_implementation="sdpa",
        gradient_checkpointing=True,
        lora={"r": a["lora_r"], "alpha": 2 * a["lora_r"]},
        threads_per_worker=a["threads"],
        report_interval_s=0,
        deepspeed=ds,
        output_dir=str(out),
    )


class PeakMemory:
    """``torch.cuda.max_memory_allocated`` through set-up and the first step, then over the steps after it."""

    def __init__(self) -> None:
        import torch

        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.through_first_step: Optional[int] = None
        self.steps: Optional[int] = None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def after_step(self, step: int) -> None:
        if not self.cuda:
            return
        self.torch.cuda.synchronize()
        if self.through_first_step is None:
            self.through_first_step = self.torch.cuda.max_memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.steps = self.torch.cuda.max_memory_allocated()

    def result(self) -> dict:
        parts = [x for x in (self.through_first_step, self.steps) if x is not None]
        return {
            "peak_bytes": max(parts) if parts else None,
            "setup_and_first_step_bytes": self.through_first_step,
            "steps_bytes": self.steps,
        }


def steady(rows: list[dict], warmup: int) -> dict:
    """Steady-state tokens/s from the loop's rows (``tokens_per_s`` x ``elapsed_s``: tokens since the first step)."""
    by = {r["step"]: r for r in rows}
    cum = {s: r["tokens_per_s"] * r["elapsed_s"] for s, r in by.items()}
    last, first = max(by), min(warmup, max(by) - 1)
    seconds = by[last]["elapsed_s"] - (by[first]["elapsed_s"] if first else 0.0)
    tokens = cum[last] - (cum[first] if first else 0.0)
    per_step = [
        (cum[s] - cum[s - 1]) / (by[s]["elapsed_s"] - by[s - 1]["elapsed_s"])
        for s in range(max(first, 1) + 1, last + 1)
    ]
    return {
        "tokens_per_s": tokens / seconds,
        "median_step_tokens_per_s": statistics.median(per_step) if per_step else None,
        "timed_s": seconds,
        "timed_tokens": round(tokens),
        "timed_steps": last - first,
    }


def case_spunge(a: dict) -> dict:
    """One unlearning job through ``run_unlearning`` at ZeRO ``a["zero"]``, in this process (rank 0 of 1)."""
    from jobs.unlearn.loop import run_unlearning
    from jobs.unlearn.outputs import JOB_MARKER, SETUP_FILE

    out = Path(a["work"]) / "jobs" / f"{a['model']}-zero{a['zero']}"
    shutil.rmtree(out, ignore_errors=True)
    spec = job_spec(a, out, a["zero"])
    mem = PeakMemory()
    rows: list[dict] = []

    def report(new: list[dict], checkpoint: Optional[str] = None) -> None:
        rows.extend(new)
        mem.after_step(new[-1]["step"])

    t0 = time.perf_counter()
    final = run_unlearning(spec, report=report)
    wall = time.perf_counter() - t0
    problems = []
    losses = [r["loss"] for r in rows]
    if len(rows) != spec.max_steps:
        problems.append(f"{len(rows)} step rows for {spec.max_steps} steps")
    if not all(math.isfinite(x) for x in losses):
        problems.append("a non-finite loss")
    if not (out / JOB_MARKER).exists() or not (out / "adapter_config.json").exists():
        problems.append("no adapter folder with its job marker in the output")
    setup = json.loads((out / SETUP_FILE).read_text())["setup_s"] if (out / SETUP_FILE).exists() else {}
    return {
        "params": final.get("params"),
        "wall_s": wall,
        "setup_s": setup,
        **steady(rows, a["warmup"]),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "memory": mem.result(),
        "problems": problems,
    }


def case_bare(a: dict) -> dict:
    """The same job's steps in a plain torch loop (no DeepSpeed): the baseline of the tokens/s ratio."""
    import torch

    from jobs.data.io import load_jsonl
    from jobs.models import load_model, load_tokenizer
    from jobs.unlearn.data import StepBatches, encode_rows
    from jobs.unlearn.engine import make_optimizer
    from jobs.unlearn.methods import build_method
    from jobs.unlearn.reference import AdapterDisabled, add_lora

    spec = job_spec(a, Path(a["work"]) / "jobs" / f"{a['model']}-bare", None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(spec.threads_per_worker)
    torch.manual_seed(spec.seed)
    mem = PeakMemory()
    method = build_method(spec.method, spec.method_params)
    tok = load_tokenizer(spec.model_path)
    model = load_model(spec.model_path, spec.dtype, attn_implementation=spec.attn_implementation).to(device)
    params = sum(p.numel() for p in model.parameters())
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # as the loop does
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = StepBatches(
        encode_rows(load_jsonl(spec.forget_path), tok, spec, "forget", method),
        encode_rows(load_jsonl(spec.retain_path), tok, spec, "retain"),
        spec.seed,
        spec.batch_size,
        1,
        0,
        1,
        tok.pad_token_id,
    )
    method.setup(model)
    model = add_lora(model, spec).to(device=device, dtype=torch.bfloat16 if spec.dtype == "bfloat16" else None)
    ref = AdapterDisabled(model) if method.needs_reference else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, spec.optimizer)
    model.train()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens, t0, losses, per_step = 0, None, [], []
    for step in range(1, a["warmup"] + a["steps"] + 1):
        if step == a["warmup"] + 1:
            sync()
            tokens, t0 = 0, time.perf_counter()
        t_step = time.perf_counter()
        n = 0
        for host in data.micro_batches(step):
            batch = {k: None if v is None else {x: y.to(device) for x, y in v.items()} for k, v in host.items()}
            out = method.loss(model, batch, ref)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            n += sum(int(v["attention_mask"].sum()) for v in host.values() if v is not None)
            losses.append(out.loss.item())  # one host read per step, as the loop's
        if step > a["warmup"]:
            tokens += n
            per_step.append(n / (time.perf_counter() - t_step))
        mem.after_step(step)
    sync()
    seconds = time.perf_counter() - t0
    problems = [] if all(math.isfinite(x) for x in losses) else ["a non-finite loss"]
    return {
        "params": params,
        "tokens_per_s": tokens / seconds,
        "median_step_tokens_per_s": statistics.median(per_step),
        "timed_s": seconds,
        "timed_tokens": tokens,
        "timed_steps": a["steps"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "memory": mem.result(),
        "problems": problems,
    }


# --------------------------------------------------------------------------------------------- eval, merge


def case_eval(a: dict) -> dict:
    """``evaluate_model`` (the qa suite: scoring and greedy generation) on the saved model folder."""
    import torch

    from jobs.evaluate import evaluate_model

    data = Path(a["work"]) / "data"
    mem = PeakMemory()
    t0 = time.perf_counter()
    res = evaluate_model(
        str(Path(a["work"]) / "models" / a["model"]),
        {"forget": str(data / "eval_forget.jsonl"), "retain": str(data / "eval_retain.jsonl")},
        suites=["qa"],
        batch_size=a["eval_batch"],
        max_new_tokens=a["max_new_tokens"],
        max_length=128,
        dtype=a["dtype"],
        attn_implementation="sdpa",
    )
    wall = time.perf_counter() - t0
    if mem.cuda:
        torch.cuda.synchronize()
    want = [f"{s}_{m}" for s in ("forget", "retain") for m in ("prob", "rouge", "truth_ratio", "gen_tokens")]
    want.append("model_utility")
    missing = [k for k in want if k not in res["metrics"]]
    bad = [k for k, v in res["metrics"].items() if not math.isfinite(v)]
    problems = ([f"missing metrics {missing}"] if missing else []) + ([f"non-finite {bad}"] if bad else [])
    return {
        "wall_s": wall,
        "seconds": res["seconds"],
        "tokens": res["tokens"],
        "params": res["params"],
        "tokens_per_s": res["tokens"] / res["seconds"],
        "metrics": res["metrics"],
        "placement": res.get("placement"),
        "peak_bytes": torch.cuda.max_memory_allocated() if mem.cuda else None,
        "problems": problems,
    }


def case_merge(a: dict) -> dict:
    """A streaming TIES merge of the two perturbed copies onto the base; the output must load and run."""
    import torch

    from jobs.merge import MERGE_MARKER, merge_models
    from jobs.models import load_model, load_tokenizer
    from jobs.shards import Checkpoint
    from jobs.spec import MergeSpec

    work = Path(a["work"])
    base = work / "models" / a["model"]
    out = work / "merged"
    shutil.rmtree(out, ignore_errors=True)
    spec = MergeSpec(
        base_model_path=str(base),
        model_paths={f"ft{i}": str(work / "merge_inputs" / f"ft{i}") for i in (1, 2)},
        method="ties",
        dtype=a["dtype"],
        output_dir=str(out),
    )
    t0 = time.perf_counter()
    merge_models(spec)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    marker = json.loads((out / MERGE_MARKER).read_text())
    problems = []
    if "stream" not in marker.get("engine", ""):
        problems.append(f"engine {marker.get('engine')!r}, not the streaming merge")
    base_ck, out_ck = Checkpoint(str(base)), Checkpoint(str(out))
    if set(base_ck.shapes) != set(out_ck.shapes):
        problems.append("the merged tensors' names differ from the base's")
    diffs = [float((out_ck.tensor(n).float() - base_ck.tensor(n).float()).abs().max()) for n in sorted(base_ck.shapes)]
    if not 0 < max(diffs) < 0.05:
        problems.append(f"largest |merged - base| is {max(diffs):.3g} (copies differ by ~1e-3 per element)")
    t1 = time.perf_counter()
    model = load_model(str(out), a["dtype"])
    tok = load_tokenizer(str(out))
    with torch.no_grad():
        logits = model(**tok(["Where was Ana Lind born?"], return_tensors="pt")).logits
    if not torch.isfinite(logits.float()).all():
        problems.append("the merged model's logits are not finite")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {
        "wall_s": wall,
        "load_check_s": time.perf_counter() - t1,
        "merge_peak_rss_bytes": rss,
        "model_bytes": size,
        "engine": marker.get("engine"),
        "max_abs_delta": max(diffs),
        "problems": problems,
    }


CASES: dict[str, Callable[[dict], dict]] = {
    "build": case_build,
    "spunge": case_spunge,
    "bare": case_bare,
    "eval": case_eval,
    "merge": case_merge,
}


# --------------------------------------------------------------------------------------------- running cases


def _case_entry(rank: int, world: int, kind: str, args: dict) -> dict:
    """A case in a spawned rank (``spawn_ranks``): its result, the forbidden modules it holds, its versions."""
    return _run_case(kind, args)


def _run_case(kind: str, args: dict) -> dict:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch's gloo reduce_scatter_tensor deprecation, once per bucket and step on the CPU
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
    result = CASES[kind](args)
    result["forbidden_imports"] = sorted(m for m in FORBIDDEN if m in sys.modules)
    result["versions"] = versions()
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's, so far
    return result


def versions() -> dict[str, str]:
    """The versions of the packages this process imported, of those the check depends on."""
    from importlib import metadata

    out = {}
    for dist, module in (
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("peft", "peft"),
        ("accelerate", "accelerate"),
        ("deepspeed", "deepspeed"),
        ("mergekit", "mergekit"),
        ("safetensors", "safetensors"),
        ("tokenizers", "tokenizers"),
        ("pydantic", "pydantic"),
        ("rouge-score", "rouge_score"),
    ):
        if module in sys.modules:
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = getattr(sys.modules[module], "__version__", "?")
    return out


class CaseTimeout(Exception):
    pass


def run_isolated(kind: str, args: dict, budget: float) -> dict:
    from jobs.unlearn.solo import spawn_ranks

    return spawn_ranks(_case_entry, 1, kind, args, timeout=budget)[0]


def run_in_process(kind: str, args: dict, budget: float) -> dict:
    """In this process, stopped by SIGALRM after ``budget`` s (between Python byte codes)."""
    from jobs.unlearn.solo import single_process_env

    single_process_env()

    def stop(signum, frame):
        raise CaseTimeout(f"still running after its {budget:.0f} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(math.ceil(budget))))
    try:
        return _run_case(kind, args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def short_error(e: BaseException) -> str:
    text = str(e).strip()
    lines = [x for x in text.splitlines() if x.strip()]
    # a rank's traceback (RankError): its last line is the exception
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:400]


# --------------------------------------------------------------------------------------------- the plan


def estimate_memory(shape: dict, zero: int, batch: int, seq: int, lora_r: int, needs_reference: bool) -> dict:
    """docs/scaling.md's per-GPU estimate for this job on one GPU, with the loop's DeepSpeed sizes."""
    m = ModelShape(
        layers=shape["num_hidden_layers"],
        hidden=shape["hidden_size"],
        heads=shape["num_attention_heads"],
        vocab=shape["vocab_size"],
        intermediate=shape["intermediate_size"],
        tied_embeddings=shape["tie_word_embeddings"],
        kv_heads=shape["num_key_value_heads"],
    )
    m = replace(m, params=float(llama_param_count(m)))
    h = shape["hidden_size"]
    # jobs.unlearn.engine.deepspeed_config: at ZeRO-3 the reduce bucket is h^2; at ZeRO-2 DeepSpeed's 5e8
    bucket = h * h if zero == 3 else 5e8
    s = JobSetup(
        zero=zero,
        gpus=1,
        micro_batch=batch,
        seq=seq,
        gradient_checkpointing=True,
        attn="sdpa",
        lora_r=lora_r,
        needs_reference=needs_reference,
        grad_passes=1 if zero == 3 else 2,
        reduce_bucket_size=bucket,
    )
    est = estimate(m, s)
    return {
        "peak_bytes": est["bytes"]["peak"],
        "init_peak_bytes": est["bytes"]["init_peak"],
        "bytes": est["bytes"],
        "setup": est["setup"],
        "params": m.params,
    }


def plan(args) -> list[dict]:
    """The cases in order: name, kind, arguments, time limit, the cases they need."""
    cpu = args.cpu
    shapes = TINY_SHAPES if cpu else SHAPES
    common = {
        "work": str(args.work),
        "dtype": args.dtype,
        "method": "npo",
        "lora_r": args.lora_r or (4 if cpu else 16),
        "warmup": args.warmup if args.warmup is not None else (1 if cpu else 3),
        "steps": args.steps or (3 if cpu else 20),
        "threads": args.threads,
    }
    merge_model = args.merge_model if "merge" not in args.skip else None
    eval_model = args.eval_model
    cases = [
        {
            "name": "build",
            "kind": "build",
            "budget": 30 if cpu else 120,
            "needs": [],
            "args": {
                **common,
                "models": sorted(
                    {
                        *args.models,
                        *([merge_model] if merge_model else []),
                        *([eval_model] if "eval" not in args.skip else []),
                    }
                ),
                "shapes": shapes,
                "rows": 32 if cpu else 64,
                "sentences": 20 if cpu else 120,
                "eval_rows": 8 if cpu else 64,
                "merge_model": merge_model,
            },
        }
    ]
    for model in args.models:
        batch, seq = (4, 64) if cpu else GPU_BATCH[model]
        batch, seq = args.batch_size or batch, args.seq_len or seq
        a = {**common, "model": model, "batch": batch, "seq": seq}
        if "bare" not in args.skip:
            cases.append(
                {"name": f"bare/{model}", "kind": "bare", "budget": 30 if cpu else 90, "needs": ["build"], "args": a}
            )
        for zero in args.zero:
            cases.append(
                {
                    "name": f"spunge/{model}/zero{zero}",
                    "kind": "spunge",
                    "budget": 45 if cpu else 150,
                    "needs": ["build"],
                    "args": {**a, "zero": zero},
                }
            )
    if "eval" not in args.skip:
        cases.append(
            {
                "name": f"eval/{eval_model}",
                "kind": "eval",
                "budget": 30 if cpu else 120,
                "needs": ["build"],
                "args": {
                    **common,
                    "model": eval_model,
                    "eval_batch": 8 if cpu else 32,
                    "max_new_tokens": 8 if cpu else 32,
                },
            }
        )
    if merge_model:
        cases.append(
            {
                "name": f"merge/{merge_model}",
                "kind": "merge",
                "budget": 30 if cpu else 150,
                "needs": ["build"],
                "args": {**common, "model": merge_model},
            }
        )
    return cases


# --------------------------------------------------------------------------------------------- report


def _gib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def _f(x: Optional[float], fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def training_table(results: dict, args, peak: Optional[float], shapes: dict) -> list[dict]:
    rows = []
    for model in args.models:
        bare = results.get(f"bare/{model}", {})
        for zero in args.zero:
            r = results.get(f"spunge/{model}/zero{zero}", {})
            a = next((c["args"] for c in args.cases if c["name"] == f"spunge/{model}/zero{zero}"), None)
            est = estimate_memory(shapes[model], zero, a["batch"], a["seq"], a["lora_r"], True) if a else None
            tps, btps = r.get("tokens_per_s"), bare.get("tokens_per_s")
            n = r.get("params") or bare.get("params")
            mem = (r.get("memory") or {}).get("peak_bytes")
            steps_mem = (r.get("memory") or {}).get("steps_bytes")
            est_peak = max(est["peak_bytes"], est["init_peak_bytes"]) if est else None
            rows.append(
                {
                    "model": model,
                    "zero": zero,
                    "batch": a and a["batch"],
                    "seq": a and a["seq"],
                    "params": n,
                    "tokens_per_s": tps,
                    "bare_tokens_per_s": btps,
                    "ratio": tps / btps if tps and btps else None,
                    "median_step_ratio": (
                        r["median_step_tokens_per_s"] / bare["median_step_tokens_per_s"]
                        if r.get("median_step_tokens_per_s") and bare.get("median_step_tokens_per_s")
                        else None
                    ),
                    "mfu": 6 * n * tps / (peak * 1e12) if peak and n and tps else None,
                    "bare_mfu": 6 * n * btps / (peak * 1e12) if peak and n and btps else None,
                    "peak_bytes": mem,
                    "steps_peak_bytes": steps_mem,
                    "bare_peak_bytes": (bare.get("memory") or {}).get("peak_bytes"),
                    "estimate_peak_bytes": est and est["peak_bytes"],
                    "estimate_init_peak_bytes": est and est["init_peak_bytes"],
                    "memory_vs_estimate": mem / est_peak if mem and est_peak else None,
                    "estimate": est,
                }
            )
    return rows


def print_report(record: dict) -> None:
    print(
        "\n| model | ZeRO | batch x seq | spunge tok/s | bare tok/s | spunge/bare | median-step | MFU spunge / bare "
        "| peak GiB (steps) | estimate GiB (start-up) | measured/estimate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in record["training"]:
        mfu = f"{_f(r['mfu'] and 100 * r['mfu'])}% / {_f(r['bare_mfu'] and 100 * r['bare_mfu'])}%" if r["mfu"] else "-"
        print(
            f"| {r['model']} | {r['zero']} | {r['batch']} x {r['seq']} | {_f(r['tokens_per_s'], '.0f')} | "
            f"{_f(r['bare_tokens_per_s'], '.0f')} | {_f(r['ratio'], '.3f')} | {_f(r['median_step_ratio'], '.3f')} | "
            f"{mfu} | {_gib(r['peak_bytes'])} ({_gib(r['steps_peak_bytes'])}) | "
            f"{_gib(r['estimate_peak_bytes'])} ({_gib(r['estimate_init_peak_bytes'])}) | "
            f"{_f(r['memory_vs_estimate'], '.2f')} |"
        )
    print("\n| case | status | seconds | notes |")
    print("|---|---|---|---|")
    for name, c in record["cases"].items():
        res = c.get("result") or {}
        note = c.get("error") or "; ".join(res.get("problems", []))
        if not note and c["kind"] == "eval":
            note = (
                f"{res['tokens']} tokens, {res['tokens_per_s']:.0f} tok/s, peak {_gib(res.get('peak_bytes'))} GiB, "
                f"forget_prob {res['metrics'].get('forget_prob', float('nan')):.3g}"
            )
        elif not note and c["kind"] == "merge":
            rss = res["merge_peak_rss_bytes"]
            note = (
                f"ties k=2, {res['model_bytes'] / 1e6:.1f} MB model, process peak RSS {rss / 1e9:.2f} GB "
                f"({rss / res['model_bytes']:.1f}x the model), load check {res['load_check_s']:.1f} s"
            )
        elif not note and c["kind"] == "build":
            note = ", ".join(f"{m} {v['params'] / 1e6:.1f}M params" for m, v in res.get("models", {}).items())
        print(f"| {name} | {c['status']} | {c['seconds']:.1f} | {note} |")
    imp = record["imports"]
    print(
        f"\nimport check (ray, mlflow, datasets never imported): {'ok' if imp['ok'] else 'FAILED'}"
        + ("" if imp["ok"] else f" {imp['found']}")
    )


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cpu",
        "--smoke",
        action="store_true",
        help="tiny models on the CPU (DeepSpeed's CPU accelerator, gloo): the same code paths, in tens of seconds",
    )
    ap.add_argument("--out", type=Path, default=Path("device-check"), help="folder of device_check.json")
    ap.add_argument(
        "--work",
        type=Path,
        help="folder for models, data and job outputs (default: a temporary one, removed at the end)",
    )
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama-1b"], choices=sorted(SHAPES))
    ap.add_argument("--zero", nargs="+", type=int, default=[2, 3], choices=[2, 3])
    ap.add_argument("--eval-model", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--merge-model", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--skip", nargs="*", default=[], choices=["bare", "eval", "merge"])
    ap.add_argument("--batch-size", type=int, help="micro batch (default: smollm2 16, llama-1b 8; --cpu 4)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default 512; --cpu 64)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3; --cpu 1)")
    ap.add_argument("--steps", type=int, help="timed steps (default 20; --cpu 3)")
    ap.add_argument("--lora-r", type=int, help="LoRA rank (default 16; --cpu 4)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)), help="torch threads")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    ap.add_argument(
        "--budget",
        type=float,
        help="seconds for all cases together (default 450; --cpu 170): a case gets at most what is left",
    )
    ap.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each case in its own process (default on the GPU; --cpu runs them in this one)",
    )
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the spawned cases inherit it
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(
            "device_check: no CUDA device (torch.cuda.is_available() is False); --cpu runs the CPU smoke check",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.cpu else "cuda")
    isolate = (not args.cpu) if args.isolate is None else args.isolate
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    peak = args.peak_tflops or (None if args.cpu else peak_tflops(device))
    if not args.cpu and peak is None:
        print(f"device_check: no dense bf16 peak known for {device!r}: MFU is left out (--peak-tflops)")
    budget = args.budget or (170.0 if args.cpu else 450.0)
    tmp = None
    if args.work is None:
        tmp = tempfile.mkdtemp(prefix="spunge-device-check-")
        args.work = Path(tmp)
    args.work = args.work.resolve()
    args.cases = plan(args)
    shapes = TINY_SHAPES if args.cpu else SHAPES
    print(
        f"device_check on {device} ({'isolated processes' if isolate else 'this process'}), "
        f"{len(args.cases)} cases, budget {budget:.0f} s, work {args.work}",
        flush=True,
    )

    record: dict[str, Any] = {
        "device": device,
        "mode": "cpu" if args.cpu else "gpu",
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "isolated": isolate,
        "budget_s": budget,
        "cases": {},
    }
    done: dict[str, dict] = {}
    if not isolate:  # a process group address inherited from a parent that still holds its port cannot be bound
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
    try:
        for case in args.cases:
            name, left = case["name"], budget - (time.perf_counter() - t_start)
            entry: dict[str, Any] = {
                "kind": case["kind"],
                "budget_s": case["budget"],
                "args": {k: v for k, v in case["args"].items() if k not in ("shapes", "work")},
            }
            record["cases"][name] = entry
            t0 = time.perf_counter()
            missing = [n for n in case["needs"] if record["cases"].get(n, {}).get("status") != "ok"]
            if missing:
                entry.update(status="skipped", seconds=0.0, error=f"needs {', '.join(missing)}")
            elif left < 5:
                entry.update(status="skipped", seconds=0.0, error=f"the {budget:.0f} s budget is spent")
            else:
                limit = min(case["budget"], left)
                print(f"== {name} (limit {limit:.0f} s)", flush=True)
                try:
                    run = run_isolated if isolate else run_in_process
                    res = run(case["kind"], case["args"], limit)
                    done[name] = res
                    entry.update(result=res, status="ok" if not res.get("problems") else "FAILED")
                except BaseException as e:  # noqa: BLE001 (every case reports; KeyboardInterrupt still stops)
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    traceback.print_exc()
                    entry.update(status="FAILED", error=short_error(e))
                entry["seconds"] = time.perf_counter() - t0
            why = entry.get("error") or "; ".join(entry.get("result", {}).get("problems", []))
            status = entry["status"] + (f": {why}" if entry["status"] != "ok" else "")
            print(f"   {name}: {status} ({entry['seconds']:.1f} s)", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    found = sorted(
        {m for r in done.values() for m in r.get("forbidden_imports", [])} | {m for m in FORBIDDEN if m in sys.modules}
    )
    record["imports"] = {"forbidden": list(FORBIDDEN), "found": found, "ok": not found, "cases_checked": sorted(done)}
    record["versions"] = {k: v for r in done.values() for k, v in r.get("versions", {}).items()}
    record["training"] = training_table(done, args, peak, shapes)
    record["total_s"] = time.perf_counter() - t_start
    failed = [n for n, c in record["cases"].items() if c["status"] != "ok"] + ([] if not found else ["imports"])
    record["failed"] = failed
    print_report(record)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "device_check.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(
        f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'} in {record['total_s']:.0f} s; "
        f"wrote {path}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
