"""The ``parity`` command line: ``plan`` and ``check``.

Exit codes: 0 pass, 1 parity failure (per ``--fail-on``), 2 usage or input error, 3 environment error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from parity.errors import InputError, ParityError

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


@app.command("plan")
def plan_command(
    job_dir: Annotated[
        Path,
        typer.Argument(
            help="ai-toolkit job folder (config.yaml, samples/, checkpoints).", show_default=False
        ),
    ],
    assets: Annotated[
        Path | None, typer.Option("--assets", help="Folder searched by file name for reference images.")
    ] = None,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json", metavar="FILE|-", help="Write the plan as JSON to FILE, or to stdout with '-'."
        ),
    ] = None,
) -> None:
    """For each preview: the settings and weights ai-toolkit used, and whether it can be replayed."""
    from parity.plan import build_plan

    plan = build_plan(job_dir, assets)
    if json_out == "-":
        sys.stdout.write(plan.to_json())
        return
    if json_out is not None:
        _write_outside_job(Path(json_out), job_dir, plan.to_json())
    _print_plan(plan)
    if json_out is not None:
        console.print(f"plan written to {json_out}", highlight=False)


def _write_outside_job(out: Path, job_dir: Path, text: str) -> None:
    if out.resolve().is_relative_to(job_dir.resolve()):
        raise InputError(out, "refusing to write inside the job folder: parity never changes a job folder")
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(out, f"cannot write: {exc.strerror or exc}") from None


def _print_plan(plan) -> None:
    for warning in plan.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(
        f"[bold]{plan.job_name}[/] ({plan.arch}): base {plan.base_model}, train {plan.train_dtype}, "
        f"save {plan.save_dtype}, quantize {plan.quantize} (te {plan.quantize_te}); "
        f"{plan.replayable_count} of {len(plan.items)} previews replayable",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    for column in ("step", "#", "seed", "size", "gen", "steps", "cfg", "m", "merged", "weights", "ok"):
        table.add_column(column, overflow="fold" if column == "weights" else "ellipsis")
    prompts: dict[tuple[str, int], tuple[str | None, str | None]] = {}
    for item in plan.items:
        prompts.setdefault((item.round, item.prompt_index), (item.prompt, item.negative_prompt))
        table.add_row(
            f"{item.step}{' first' if item.round == 'first_sample' else ''}",
            str(item.prompt_index),
            _cell(item.seed),
            "-" if item.width is None else f"{item.width}x{item.height}",
            "-" if item.gen_width is None else f"{item.gen_width}x{item.gen_height}",
            _cell(item.num_inference_steps),
            _cell(item.guidance_scale),
            _cell(item.network_multiplier),
            {True: "yes", False: "no", None: "-"}[item.lora_merged],
            (item.checkpoint or item.weights).removesuffix(".safetensors"),
            "[green]yes[/]" if item.replayable else "[red]no[/]",
        )
    console.print(table)
    for (round_name, index), (prompt, negative) in sorted(prompts.items()):
        label = f"#{index}" if round_name == "sample" else f"first_sample #{index}"
        console.print(f"{label}: {prompt!r}  negative: {negative!r}", highlight=False, soft_wrap=True)
    for item in plan.items:
        if not item.replayable:
            console.print(f"[red]{item.file}[/]: {item.reason}", highlight=False, soft_wrap=True)


def _cell(value) -> str:
    return "-" if value is None else str(value)


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
