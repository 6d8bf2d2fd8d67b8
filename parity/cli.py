"""The ``parity`` command line: ``plan`` and ``check``.

Exit codes: 0 pass, 1 parity failure (per ``--fail-on``), 2 usage or input error, 3 environment error.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from parity.errors import ParityError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Replay ai-toolkit training previews and score inference parity.",
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """parity: preview-vs-inference parity for ai-toolkit LoRAs."""


def main() -> None:
    """Console entry point: every ParityError becomes one line on stderr and its exit code."""
    try:
        app(standalone_mode=False)
    except ParityError as exc:
        err_console.print(f"[bold red]error:[/] {exc.line()}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        raise
