"""Merge benchmark: spunge's merge path vs the mergekit CLI on k fine-tuned-looking SmolLM2-135M checkpoints.

Makes k checkpoints ``base + delta_i`` (delta_i: seeded Gaussian noise, std ``--noise`` per element, float32
safetensors HF folders under ``--work``), then merges them onto the base for each method and k with

* **spunge**: ``jobs.merge.merge_models(MergeSpec(...))`` in a fresh Python process;
* **mergekit**: ``mergekit-yaml`` (the CLI, defaults but no model card) on the config spunge builds
  (``jobs.merge.mergekit_config``), i.e. the same inputs and parameters.

Each merge runs in its own child process under a small wrapper that reports the child's wall time and its
peak resident set size (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the largest RSS any descendant reached);
interpreter start-up and imports are included on both sides. The outputs are compared tensor by tensor
(max abs diff; key sets must agree). Figures are ratios: wall spunge / wall mergekit, peak RSS / the size
of one model's weights file (538 MB for SmolLM2-135M in float32).

    python benchmarks/merge.py                       # ties + task_arithmetic at k = 2, 4, 8
    python benchmarks/merge.py --methods ties --ks 2 # fewer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "merge.json"
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)

# Runs argv[1:] as a child; prints {"wall_s", "peak_rss_bytes", "rc"} of that child (ru_maxrss is KiB on Linux).
WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "rc": rc}))
"""


def base_model() -> Path:
    """The cached Hugging Face folder of SmolLM2-135M-Instruct (converted once from the packaged GGUF)."""
    from jobs.models import convert_gguf, packaged_gguf

    return Path(convert_gguf(packaged_gguf(), Path.home() / ".cache/spunge/smollm2-135m-instruct"))


def make_checkpoints(base: Path, work: Path, k: int, noise: float, seed: int) -> list[Path]:
    """k folders ft_i holding base + N(0, noise^2) per float tensor (seed + i), plus the base's side files;
    folders already there are reused."""
    import torch
    from safetensors.torch import load_file, save_file

    state = None
    folders = []
    for i in range(k):
        folder = work / f"ft_{i}"
        folders.append(folder)
        if (folder / "model.safetensors").exists():
            continue
        state = state if state is not None else load_file(base / "model.safetensors")
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed + i)
        tuned = {
            name: (w + noise * torch.randn(w.shape, generator=g, dtype=w.dtype)) if w.is_floating_point() else w
            for name, w in state.items()
        }
        save_file(tuned, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del tuned
        for name in SIDE_FILES:
            if (base / name).exists():
                shutil.copy2(base / name, folder / name)
    return folders


def measured(cmd: list[str]) -> dict:
    """Wall time and peak RSS of cmd, run as the only child of a fresh wrapper process."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        raise RuntimeError(f"wrapper failed: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["rc"]:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {result['rc']}: {out.stderr[-3000:]}")
    return result


def spec_for(method: str, base: Path, models: list[Path], out: Path) -> dict:
    """The MergeSpec fields of one merge (the project's default parameters for the method)."""
    return {
        "base_model_path": str(base),
        "model_paths": {f"m{i}": str(p) for i, p in enumerate(models)},
        "method": method,
        "output_dir": str(out),
    }


def run_spunge(spec: dict, work: Path) -> dict:
    """jobs.merge.merge_models on spec in a fresh process."""
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    code = (
        "import json, sys; from jobs.merge import merge_models; from jobs.spec import MergeSpec; "
        "merge_models(MergeSpec(**json.load(open(sys.argv[1]))))"
    )
    return measured([sys.executable, "-c", code, str(path)])


def run_mergekit(spec: dict, work: Path) -> dict:
    """The mergekit-yaml CLI on the mergekit config spunge builds for spec."""
    import yaml

    from jobs.merge import mergekit_config
    from jobs.spec import MergeSpec

    path = work / "mergekit.yml"
    path.write_text(yaml.safe_dump(mergekit_config(MergeSpec(**spec))))
    cli = Path(sys.executable).with_name("mergekit-yaml")
    return measured([str(cli), str(path), spec["output_dir"], "--no-write-model-card", "--quiet"])


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({name: file for name in f.keys()})
    return out


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest |a - b| over every tensor of two merged folders (read one tensor at a time)."""
    from safetensors import safe_open

    fa, fb = weight_files(a), weight_files(b)
    if set(fa) != set(fb):
        raise RuntimeError(
            f"tensor names differ: only spunge {sorted(set(fa) - set(fb))[:5]}, "
            f"only mergekit {sorted(set(fb) - set(fa))[:5]}"
        )
    worst = 0.0
    for name in fa:
        with safe_open(fa[name], "pt") as x, safe_open(fb[name], "pt") as y:
            ta, tb = x.get_tensor(name), y.get_tensor(name)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            raise RuntimeError(f"{name}: {ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)}")
        worst = max(worst, (ta.double() - tb.double()).abs().max().item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"])
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder on local disk (default: a temp dir)")
    ap.add_argument("--noise", type=float, default=1e-3, help="std of each checkpoint's delta per element")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    args = ap.parse_args()

    base = base_model()
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    work = args.work or Path(tempfile.mkdtemp(prefix="spunge-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = (max(args.ks) + 2) * model_bytes
    if free < need:
        raise SystemExit(f"merge benchmark: {work} has {free / 1e9:.1f} GB free, needs {need / 1e9:.1f} GB")
    rows = []
    try:
        models = make_checkpoints(base, work, max(args.ks), args.noise, args.seed)
        for method in args.methods:
            for k in args.ks:
                spec_s = spec_for(method, base, models[:k], work / "out_spunge")
                spec_m = spec_for(method, base, models[:k], work / "out_mergekit")
                for out in (work / "out_spunge", work / "out_mergekit"):
                    shutil.rmtree(out, ignore_errors=True)
                s = run_spunge(spec_s, work)
                m = run_mergekit(spec_m, work)
                diff = max_abs_diff(work / "out_spunge", work / "out_mergekit")
                row = {
                    "method": method,
                    "k": k,
                    "spunge_wall_s": s["wall_s"],
                    "mergekit_wall_s": m["wall_s"],
                    "wall_ratio": s["wall_s"] / m["wall_s"],
                    "spunge_peak_rss_bytes": s["peak_rss_bytes"],
                    "mergekit_peak_rss_bytes": m["peak_rss_bytes"],
                    "spunge_rss_over_model": s["peak_rss_bytes"] / model_bytes,
                    "mergekit_rss_over_model": m["peak_rss_bytes"] / model_bytes,
                    "max_abs_diff": diff,
                    "load_avg_1min": os.getloadavg()[0],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_results(rows, model_bytes, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    header = (
        "| method | k | spunge wall s | mergekit wall s | wall ratio | spunge RSS / model | mergekit RSS / model "
        "| max abs diff |"
    )
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        print(
            f"| {r['method']} | {r['k']} | {r['spunge_wall_s']:.1f} | {r['mergekit_wall_s']:.1f} | "
            f"{r['wall_ratio']:.2f} | {r['spunge_rss_over_model']:.2f} | {r['mergekit_rss_over_model']:.2f} | "
            f"{r['max_abs_diff']:.3g} |"
        )
    print(f"wrote {RESULTS}")


def write_results(rows: list[dict], model_bytes: int, args: argparse.Namespace) -> None:
    """benchmarks/results/merge.json with the rows so far (rewritten after each merge)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (float32)",
                "model_bytes": model_bytes,
                "noise": args.noise,
                "seed": args.seed,
                "cpu_count": os.cpu_count(),
                "load_avg_1min_end": os.getloadavg()[0],
                "command": "python " + " ".join(sys.argv),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
