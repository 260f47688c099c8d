"""How the ``spunge`` command line ends: one line per problem on stderr and the exit code.

0 success, 1 a stage failed (one line saying which), 2 bad input (config, data, model, argument), 130 Ctrl-C.
"""

from __future__ import annotations

from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, soft_wrap=True)


def fail(msg: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)  # a message is text, not markup
    raise typer.Exit(code)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(msg)}", highlight=False, soft_wrap=True)


@contextmanager
def exit_codes(interrupted: str = "interrupted"):
    """Bad input (config, data, model) exits 2 with one line per problem; a failed stage exits 1 with
    its line; Ctrl-C exits 130 with ``interrupted``."""
    from jobs.data.loading import DataError
    from jobs.models import ModelLoadError
    from orchestrator.config.schema import ConfigError
    from orchestrator.run.context import PipelineError

    try:
        yield
    except ConfigError as e:
        for p in e.problems:
            err.print(f"[red]error:[/red] {escape(f'{e.source}: {p}')}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (DataError, ModelLoadError) as e:
        fail(str(e), 2)
    except PipelineError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(interrupted, 130)
