"""The ``parity`` command line: ``plan``, ``check``, ``lint`` and ``lora``.

Exit codes: 0 pass, 1 parity failure (per ``--fail-on``; for ``lora``: the LoRA does not apply fully), 2 usage
or input error, 3 environment error. ``lint`` exits 0 whatever it finds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from parity.errors import InputError, ParityError
from parity.seeds import SEARCH_WORDS

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
    more = (f", {plan.recoverable_count} more once parity check recovers their drawn seed (training_seed "
            f"{plan.training_seed})") if plan.recoverable_count else ""
    console.print(
        f"[bold]{plan.job_name}[/] ({plan.arch}): base {plan.base_model}, train {plan.train_dtype}, "
        f"save {plan.save_dtype}, quantize {plan.quantize} (te {plan.quantize_te}); "
        f"{plan.replayable_count} of {len(plan.items)} previews replayable{more}",
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
            "drawn" if item.seed_source == "drawn" else _cell(item.seed),
            "-" if item.width is None else f"{item.width}x{item.height}",
            "-" if item.gen_width is None else f"{item.gen_width}x{item.gen_height}",
            _cell(item.num_inference_steps),
            _cell(item.guidance_scale),
            _cell(item.network_multiplier),
            {True: "yes", False: "no", None: "-"}[item.lora_merged],
            (item.checkpoint or item.weights).removesuffix(".safetensors"),
            "[green]yes[/]" if item.replayable else "[yellow]seed?[/]" if item.recoverable else "[red]no[/]",
        )
    console.print(table)
    for (round_name, index), (prompt, negative) in sorted(prompts.items()):
        label = f"#{index}" if round_name == "sample" else f"first_sample #{index}"
        console.print(f"{label}: {prompt!r}  negative: {negative!r}", highlight=False, soft_wrap=True)
    for item in plan.items:
        if not item.replayable:
            style = "yellow" if item.recoverable else "red"
            console.print(f"[{style}]{item.file}[/]: {item.reason}", highlight=False, soft_wrap=True)


def _cell(value) -> str:
    return "-" if value is None else str(value)


VERDICT_STYLE = {"EXACT": "bold green", "PASS": "green", "DRIFT": "yellow", "FAIL": "bold red",
                 "SKIPPED": "dim", "ERROR": "bold red"}


def _parse_lora_overrides(values: list[str]) -> dict[int, Path]:
    overrides = {}
    for value in values:
        step, sep, file = value.partition("=")
        if not sep or not step.strip().isdigit() or not file:
            raise InputError(None, f"--lora expects STEP=FILE (e.g. 250=lora_step250.safetensors), got {value!r}")
        path = Path(file).expanduser()
        if not path.is_file():
            raise InputError(path, "LoRA file given with --lora not found")
        overrides[int(step)] = path
    return overrides


@app.command("check")
def check_command(
    job_dir: Annotated[Path, typer.Argument(help="ai-toolkit job folder.", show_default=False)],
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="Base model folder or Hugging Face id (cache only).")
    ] = None,
    steps: Annotated[str, typer.Option(help="Which rounds: all, latest or N,M,...")] = "all",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="bf16, fp16 or fp32 (default: the job's train.dtype).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Report folder (never inside the job folder).")] = Path(
        "parity-report"
    ),
    fail_on: Annotated[str, typer.Option("--fail-on", help="Exit 1 on: fail, or drift (DRIFT too).")] = "fail",
    noise: Annotated[
        str, typer.Option(help="Initial-noise draw: auto (chosen from step-0 previews), native or an algorithm name.")
    ] = "auto",
    lora: Annotated[
        list[str] | None, typer.Option("--lora", metavar="STEP=FILE", help="Use FILE as the LoRA of STEP.")
    ] = None,
    assets: Annotated[Path | None, typer.Option(help="Folder searched by file name for reference images.")] = None,
    cpu_profile: Annotated[
        str, typer.Option("--cpu-profile", help="CPU kernels: native, or avx2 to compute like an AVX2-only trainer CPU.")
    ] = "native",
    kernels: Annotated[
        str,
        typer.Option(help="Kernel set: auto (on CUDA: the one that reproduces a step-0 preview), torch, flash, or "
                     "triton[:WARPS|:WIDTH=WARPS,...] (ai-toolkit's GPU default: Triton RMSNorm)."),
    ] = "auto",
    kernel_search: Annotated[
        int, typer.Option(help="Most kernel sets --kernels auto replays a step-0 preview with.")
    ] = 6,
    seed_search: Annotated[
        int, typer.Option(help="Words of training_seed's random stream searched for each seed ai-toolkit drew for "
                          "seed -1 (each distinct candidate costs one replay).")
    ] = SEARCH_WORDS,
    no_drift: Annotated[bool, typer.Option("--no-drift", help="Do not replay earlier merge rounds' drift.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Replay everything again.")] = False,
    pipeline: Annotated[
        str, typer.Option(help="aitoolkit (reproduce the previews) or server (render as ai-toolkit-inference does).")
    ] = "aitoolkit",
    diagnose: Annotated[bool, typer.Option(help="Flip knobs to name the cause of each mismatch.")] = True,
    images: Annotated[
        Path | None, typer.Option(help="Score images made elsewhere (named like the previews) instead of replays.")
    ] = None,
    ssim_pass: Annotated[float | None, typer.Option(help="PASS needs SSIM at least this.")] = None,
    psnr_pass: Annotated[float | None, typer.Option(help="PASS needs PSNR (dB) at least this.")] = None,
    ssim_drift: Annotated[float | None, typer.Option(help="DRIFT needs SSIM at least this; below is FAIL.")] = None,
    fast: Annotated[
        bool,
        typer.Option("--fast", help="Faster replays whose last bits may differ (batched CFG, maskless attention, "
                     "float32 rotary, torch.compile on CUDA): for CI smoke runs, never EXACT."),
    ] = False,
    cuda_graphs: Annotated[
        bool, typer.Option(help="Replay each denoising step as a CUDA graph (same kernels, same pixels).")
    ] = True,
) -> None:
    """Replay every preview, score it against the preview and write report.html, parity.json and junit.xml.

    Under ``torchrun --nproc-per-node N`` the replays are shared between N processes (one GPU each) and rank 0
    writes the report."""
    from pipelines.common.cpu_profile import apply_cpu_profile

    if fail_on not in ("fail", "drift"):
        raise InputError(None, f"--fail-on must be fail or drift, got {fail_on!r}")
    try:
        apply_cpu_profile(cpu_profile)
    except (ValueError, RuntimeError) as exc:
        raise InputError(None, str(exc)) from None
    from parity.check import CheckOptions, run_check
    from parity.errors import EnvironmentProblem
    from parity.replay import ReplayOptions
    from parity.scores import Thresholds

    device = _resolve_device(device)
    if kernel_search < 1:
        raise InputError(None, f"--kernel-search must be at least 1, got {kernel_search}")
    if seed_search < 1:
        raise InputError(None, f"--seed-search must be at least 1 word, got {seed_search}")
    if kernels != "auto":
        from pipelines.omnigen2.kernels import parse_profile

        try:
            name = parse_profile(kernels)[0]
        except ValueError as exc:
            raise InputError(None, f"--kernels: {exc}") from None
        if name == "flash":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                raise EnvironmentProblem(None, "--kernels flash needs the flash_attn package") from None
        if name == "triton":
            from pipelines.omnigen2.triton_norm import available

            if problem := available():
                raise EnvironmentProblem(None, f"--kernels triton: {problem}")
    defaults = Thresholds()
    thresholds = Thresholds(
        pass_min_ssim=ssim_pass if ssim_pass is not None else defaults.pass_min_ssim,
        pass_min_psnr_db=psnr_pass if psnr_pass is not None else defaults.pass_min_psnr_db,
        drift_min_ssim=ssim_drift if ssim_drift is not None else defaults.drift_min_ssim,
    )
    options = CheckOptions(
        replay=ReplayOptions(base_model=base_model, device=device, dtype=dtype, noise_algorithm=noise,
                             lora_overrides=_parse_lora_overrides(lora or []), reproduce_drift=not no_drift,
                             kernel_profile=kernels, kernel_search=kernel_search, fast=fast,
                             cuda_graphs=cuda_graphs, cpu_profile=cpu_profile),
        steps=steps, out_dir=out, assets_dir=assets, fail_on=fail_on, thresholds=thresholds,
        use_cache=not no_cache, pipeline=pipeline, diagnose=diagnose, images_dir=images, seed_search=seed_search,
    )
    if pipeline not in ("aitoolkit", "server"):
        raise InputError(None, f"--pipeline must be aitoolkit or server, got {pipeline!r}")
    _check_noise_name(noise)
    from parity import distributed

    dist = distributed.current()
    if dist.world > 1:  # torchrun: no progress bars from N processes; rank 0 writes the report
        report = run_check(job_dir, options)
        if not dist.is_main:
            raise typer.Exit(0)
        _write_reports_and_exit(report, out)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def step(label: str) -> None:
            if label.endswith((".jpg", ".png", ".webp", ".jpeg")):
                bar.update(task, advance=1, description=f"replaying {label}")
            else:
                bar.update(task, description=label)

        from parity.plan import build_plan

        total = sum(1 for i in build_plan(job_dir, assets).items if i.replayable or i.recoverable)
        bar.update(task, total=total)
        report = run_check(job_dir, options, progress=step)
    _write_reports_and_exit(report, out)


def _write_reports_and_exit(report, out: Path) -> None:
    """Rank 0 (or the one process): report.html, parity.json and junit.xml, the summary, the exit code."""
    import time

    from reports import write_reports

    start = time.perf_counter()
    paths = write_reports(report, out)
    if os.environ.get("PARITY_TIMINGS"):
        sys.stderr.write(f"[rank 0] reports: {time.perf_counter() - start:.2f}s\n")
    _print_summary(report, paths)
    raise typer.Exit(report.exit_code)


def _check_noise_name(noise: str) -> None:
    from pipelines.common.noise import ALGORITHMS

    if noise != "auto" and noise not in ALGORITHMS:
        raise InputError(None, f"--noise must be auto or one of {', '.join(ALGORITHMS)}, got {noise!r}")


def _resolve_device(device: str) -> str:
    import torch

    from parity.errors import EnvironmentProblem

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EnvironmentProblem(None, "--device cuda was asked for but torch sees no CUDA device")
        return device
    if device != "cpu":
        raise InputError(None, f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def _print_summary(report, paths) -> None:
    table = Table(title=f"parity check: {report.job_name}", title_justify="left")
    for column in ("step", "#", "preview", "verdict", "SSIM", "PSNR", "max", "causes"):
        table.add_column(column)
    for item in report.items:
        outcome = item.outcome.value
        metrics = item.score.metrics if item.score else None
        table.add_row(
            str(item.step), str(item.prompt_index), item.preview_file,
            f"[{VERDICT_STYLE.get(outcome, '')}]{outcome}[/]",
            f"{metrics.ssim:.4f}" if metrics else "-",
            ("inf" if metrics.psnr_db == float("inf") else f"{metrics.psnr_db:.1f}") if metrics else "-",
            str(metrics.max_abs_diff) if metrics else "-",
            ", ".join(c.code for c in item.causes) or "-",
        )
    console.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items() if v)
    console.print(f"{counts}  |  noise {report.noise_algorithm} ({report.noise_algorithm_reason})")
    if seeds := report.seed_recovery:
        console.print(escape(f"drawn seeds: {seeds['recovered']} of {seeds['drawn']} recovered from training_seed "
                             f"{seeds['training_seed']} ({seeds['replays']} replays, {seeds['cached']} from the cache, "
                             f"{seeds['seconds']:.1f} s)"), highlight=False)
        for record in seeds["previews"]:
            console.print(escape(f"  {record['preview']}: {record['summary']}"), highlight=False)
    for summary in report.causes_summary:
        console.print(escape(f"  [{summary.severity}] {summary.title}  ({summary.count} preview(s)) -> {summary.fix}"))
    console.print(f"report: {paths['html']}  json: {paths['json']}  junit: {paths['junit']}")
    console.print(f"exit code {report.exit_code} (--fail-on {report.fail_on})")


SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


@app.command("lint")
def lint_command(
    job_dir: Annotated[Path, typer.Argument(help="ai-toolkit job folder.", show_default=False)],
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="Base model folder whose transformer the checkpoints must fit."),
    ] = None,
    assets: Annotated[Path | None, typer.Option(help="Folder searched by file name for reference images.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """Known causes of preview/inference mismatch read from the config, file names and weights (no replay).

    Exit 0 whatever is found (findings are not failures); 2 for a job folder or base model that cannot be read.
    """
    from parity.lint import lint

    report = lint(job_dir, base_model, assets)
    if json_out:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"parity lint: {report.job_name}", title_justify="left")
    for column in ("severity", "code", "finding", "fix"):
        table.add_column(column, overflow="fold")
    for finding in report.findings:
        cause = finding.cause
        where = f" ({_previews_text(finding.previews)})" if finding.previews else ""
        table.add_row(f"[{SEVERITY_STYLE[cause.severity]}]{cause.severity}[/]", cause.code,
                      escape(cause.title + where), escape(cause.fix))
    console.print(table)
    counts = ", ".join(f"{n} {s}" for s, n in report.counts.items() if n) or "nothing found"
    checked = f"; LoRA keys matched against {report.lora_checked_against}" if report.lora_checked_against else ""
    console.print(f"{counts} ({report.rules_checked} rules){checked}", highlight=False, soft_wrap=True)


def _previews_text(previews: tuple[str, ...]) -> str:
    shown = ", ".join(previews[:3])
    return f"{len(previews)} previews: {shown}, ..." if len(previews) > 3 else shown


@app.command("lora")
def lora_command(
    file: Annotated[Path, typer.Argument(help="LoRA .safetensors file.", show_default=False)],
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="Base model folder: match against its transformer (default: real OmniGen2)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    top: Annotated[int, typer.Option(help="Modules shown in the norm table, largest first (0: all).")] = 20,
) -> None:
    """Format, ranks, dtypes, scale, metadata, matched/unmatched keys and per-module norms of a LoRA.

    Exit 0 when every key applies; 1 when the LoRA applies to 0 layers or only partly (unmatched names are
    listed); 2 for a file that is missing, not safetensors, a pickle or corrupt; 3 for a base model not found.
    """
    from parity.lora_report import inspect_lora

    report = inspect_lora(file, base_model)
    if json_out:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    else:
        _print_lora(report, top)
    raise typer.Exit(0 if report.applies else 1)


def _print_lora(report, top: int) -> None:
    meta = report.metadata
    ranks = ", ".join(f"{r} ({n} modules)" if len(report.ranks) > 1 else str(r) for r, n in report.ranks.items())
    lines = [
        f"[bold]{escape(report.file)}[/]",
        f"format      {report.format}: {report.module_count} modules, {report.tensor_count} tensors",
        f"rank        {ranks or '-'}",
        f"dtype       {', '.join(report.dtypes)}",
        f"scale       {report.scale_convention}",
        f"step        {_cell(meta.training_step)} (epoch {_cell(meta.epoch)}, from training_info)",
        f"base model  {_cell(meta.base_model_version)} (ss_base_model_version)",
        f"software    {_cell(meta.software)} {_cell(meta.software_version)}",
        f"name        {_cell(meta.name)} version {_cell(meta.version)} (output {_cell(meta.output_name)})",
        f"checked     against {escape(report.checked_against)}: {report.layer_count} Linear layers, "
        f"{report.default_target_count} of them ai-toolkit's default targets",
    ]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    if report.applies:
        console.print(f"keys        [green]all {report.module_count} modules matched[/] "
                      f"({report.tensor_count} tensors)", highlight=False)
    else:
        console.print(f"keys        [bold red]{report.problem}[/]", highlight=False, soft_wrap=True)
        for label, names in (("unmatched", report.unmatched), ("shape mismatch", report.shape_mismatches),
                             ("unrecognised key", report.unparsed_keys), ("unpaired", report.unpaired_keys)):
            for name in names:
                console.print(f"  {label}: {escape(name)}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if not report.norms:
        return
    shown = report.norms if top <= 0 else report.norms[:top]
    table = Table(title=f"per-module norms, largest ||B@A|| first ({len(shown)} of {len(report.norms)})",
                  title_justify="left")
    for column in ("module", "rank", "||B@A||_F", "||A||_F", "||B||_F"):
        table.add_column(column, justify="left" if column == "module" else "right")
    with_scale = any(n.scale != 1.0 for n in report.norms)
    if with_scale:
        table.add_column("scale", justify="right")
    for n in shown:
        row = [n.module, str(n.rank), f"{n.delta_norm:.4g}", f"{n.down_norm:.4g}", f"{n.up_norm:.4g}"]
        table.add_row(*row, *([f"{n.scale:g}"] if with_scale else []))
    console.print(table)


def main() -> None:
    """Console entry point: every ParityError becomes one line on stderr and its exit code."""
    try:
        code = app(standalone_mode=False)  # click returns a typer.Exit's code instead of raising it
    except ParityError as exc:
        err_console.print(f"[bold red]error:[/] {exc.line()}", highlight=False, soft_wrap=True)
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
    sys.exit(code if isinstance(code, int) else 0)
