"""The ``parity`` command line: ``plan``, ``check``, ``lint``, ``causes`` and ``lora``.

Exit codes (``parity.results.EXIT_CODES``): 0 pass, 1 parity failure (per ``--fail-on``; for ``lora``: the LoRA
does not apply fully), 2 usage or input error, 3 environment error, 4 internal error (a bug in parity), 5 nothing
checked, 130 interrupted. ``lint`` exits 0 whatever it finds. Every error is one line on stderr, never a
traceback (``--debug`` adds the traceback of an internal error).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from parity import __version__
from parity.errors import InputError, ParityError
from parity.seeds import SEARCH_WORDS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Replay ai-toolkit training previews and score inference parity.",
)
console = Console()
err_console = Console(stderr=True)


INTERNAL_ERROR, INTERRUPTED = 4, 130
INTERRUPTED_LINE = "interrupted: re-run the same command to resume"


def _show_version(value: bool) -> None:
    if value:
        console.print(f"parity {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="On an internal error (exit 4), print the traceback too. Accepted "
                           "anywhere on the command line (or PARITY_DEBUG=1).")
    ] = False,
) -> None:
    """parity: preview-vs-inference parity for ai-toolkit LoRAs."""


def _finite(value: float | None) -> float | None:
    """Option callback: NaN or an infinity is a usage error (it would silently turn every PASS into DRIFT)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


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
    from parity.safe_io import atomic_file, output_errors

    if out.exists() and not out.is_file():  # /dev/stderr, a FIFO: a stream, written as one
        with output_errors(out, "the plan"), open(out, "w", encoding="utf-8") as handle:
            handle.write(text)
        return
    target = out.resolve() if out.is_symlink() else out  # replace the file a link points to, not the link
    with atomic_file(target, "the plan") as handle:  # a full disk leaves no half-written plan
        handle.write(text.encode("utf-8"))


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


def _parse_lora_overrides(values: list[str], plan) -> dict[int, Path]:
    """``--lora STEP=FILE`` values; each FILE a regular file, each STEP one that has previews in ``plan``."""
    from parity.safe_io import regular_file_problem

    overrides = {}
    steps = sorted({item.step for item in plan.items})
    for value in values:
        step, sep, file = value.partition("=")
        if not sep or not step.strip().isdigit() or not file:
            raise InputError(None, f"--lora expects STEP=FILE (e.g. 250=lora_step250.safetensors), got {value!r}")
        path = Path(file).expanduser()
        if (problem := regular_file_problem(path)) is not None:
            raise InputError(path, f"LoRA file given with --lora {'not found' if problem == 'not found' else problem}")
        if path.suffix.lower() != ".safetensors":
            raise InputError(path, "--lora needs a .safetensors file (parity never loads pickles)")
        if int(step) not in steps:
            raise InputError(path, f"--lora {value}: no preview at step {int(step)}, so this LoRA would replay "
                                   f"nothing (previews at steps {', '.join(map(str, steps))})")
        overrides[int(step)] = path
    return overrides


# check's options, one alias each so that the command's signature reads as a list
_BaseModel = Annotated[str | None, typer.Option("--base-model", help="Base model folder or Hugging Face id (cache only).")]
_Steps = Annotated[str, typer.Option(help="Which rounds: all, latest or N,M,...")]
_Device = Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")]
_Dtype = Annotated[str | None, typer.Option(help="bf16, fp16 or fp32 (default: the job's train.dtype).")]
_Out = Annotated[Path, typer.Option("--out", help="Report folder (never inside the job folder).")]
_FailOn = Annotated[str, typer.Option("--fail-on", help="Exit 1 on: fail, or drift (DRIFT too).")]
_Noise = Annotated[str, typer.Option(help="Initial-noise draw: auto (chosen from step-0 previews), native or an "
                                          "algorithm name.")]
_Lora = Annotated[list[str] | None, typer.Option("--lora", metavar="STEP=FILE", help="Use FILE as the LoRA of STEP.")]
_Assets = Annotated[Path | None, typer.Option(help="Folder searched by file name for reference images.")]
_CpuProfile = Annotated[str, typer.Option("--cpu-profile", help="CPU kernels: native, or avx2 to compute like an "
                                                                "AVX2-only trainer CPU.")]
_Kernels = Annotated[str, typer.Option(help="Kernel set: auto (on CUDA: the one that reproduces a step-0 preview), "
                                            "torch, flash, or triton[:WARPS|:WIDTH=WARPS,...] (ai-toolkit's GPU "
                                            "default for OmniGen2: Triton RMSNorm).")]
_KernelSearch = Annotated[int, typer.Option(help="Most kernel sets --kernels auto replays a step-0 preview with.")]
_NoDrift = Annotated[bool, typer.Option("--no-drift", help="Do not replay earlier merge rounds' drift.")]
_NoCache = Annotated[bool, typer.Option("--no-cache", help="Replay everything again.")]
_Pipeline = Annotated[str, typer.Option(help="aitoolkit (reproduce the previews) or server (render as "
                                             "ai-toolkit-inference does).")]
_Diagnose = Annotated[bool, typer.Option(help="Flip knobs to name the cause of each mismatch.")]
_Images = Annotated[Path | None, typer.Option(help="Score images made elsewhere (named like the previews) instead "
                                                   "of replays.")]
_SsimPass = Annotated[float | None, typer.Option(help="PASS needs SSIM at least this.", callback=_finite)]
_PsnrPass = Annotated[float | None, typer.Option(help="PASS needs PSNR (dB) at least this.", callback=_finite)]
_SsimDrift = Annotated[float | None, typer.Option(help="DRIFT needs SSIM at least this; below is FAIL.",
                                                  callback=_finite)]
_Fast = Annotated[bool, typer.Option("--fast", help="Faster replays whose last bits may differ (batched CFG, "
                                                    "torch.compile on CUDA; OmniGen2: maskless attention, float32 "
                                                    "rotary; FLUX.1: fused q/k/v): for CI smoke "
                                                    "runs, never EXACT.")]
_CudaGraphs = Annotated[bool, typer.Option(help="Replay each denoising step as a CUDA graph (same kernels, same "
                                                "pixels).")]
_SeedSearch = Annotated[int, typer.Option(help="Words of training_seed's random stream searched for each seed "
                                                 "ai-toolkit drew for seed -1 (each distinct candidate costs one "
                                                 "replay).")]
_Github = Annotated[bool | None, typer.Option("--github/--no-github", help="GitHub Actions output: a step summary "
                                              "in $GITHUB_STEP_SUMMARY and an error annotation per failing preview "
                                              "(default: when GITHUB_ACTIONS=true).")]


@app.command("check")
def check_command(
    job_dir: Annotated[Path, typer.Argument(help="ai-toolkit job folder.", show_default=False)],
    base_model: _BaseModel = None, steps: _Steps = "all", device: _Device = "auto", dtype: _Dtype = None,
    out: _Out = Path("parity-report"), fail_on: _FailOn = "fail", noise: _Noise = "auto", lora: _Lora = None,
    assets: _Assets = None, cpu_profile: _CpuProfile = "native", kernels: _Kernels = "auto",
    kernel_search: _KernelSearch = 6, no_drift: _NoDrift = False, no_cache: _NoCache = False,
    pipeline: _Pipeline = "aitoolkit", diagnose: _Diagnose = True, images: _Images = None,
    ssim_pass: _SsimPass = None, psnr_pass: _PsnrPass = None, ssim_drift: _SsimDrift = None, fast: _Fast = False,
    cuda_graphs: _CudaGraphs = True, github: _Github = None, seed_search: _SeedSearch = SEARCH_WORDS,
) -> None:
    """Replay every preview, score it against the preview and write report.html, parity.json and junit.xml.

    Under ``torchrun --nproc-per-node N`` the replays are shared between N processes (one GPU each) and rank 0
    writes the report."""
    from parity import distributed
    from parity.check import run_check, select_items
    from parity.ci import github_wanted
    from parity.progress import progress_for

    options, plan = _check_options(**locals())
    github = github_wanted(github)
    dist = distributed.current()
    if dist.world > 1:  # torchrun: no progress bars from N processes; rank 0 writes the report
        report = run_check(job_dir, options)
        dist.close()  # every result has reached rank 0; the report needs no collective
        if not dist.is_main:
            raise typer.Exit(0)
        _write_reports_and_exit(report, out, github)
    total = sum(1 for i in select_items(plan, steps) if i.replayable or i.recoverable)
    with progress_for(err_console, total) as progress:
        report = run_check(job_dir, options, progress=progress)
    _write_reports_and_exit(report, out, github)


def _check_options(job_dir: Path, base_model, steps, device, dtype, out, fail_on, noise, lora, assets, cpu_profile,
                   kernels, kernel_search, no_drift, no_cache, pipeline, diagnose, images, ssim_pass, psnr_pass,
                   ssim_drift, fast, cuda_graphs, seed_search, **_):
    """``check``'s arguments validated (every problem the files can show before torch is imported and the model
    loaded) and turned into CheckOptions; returns them with the plan."""
    from parity.plan import build_plan
    from parity.safe_io import check_out_dir
    from parity.scores import Thresholds
    from pipelines.common.cpu_profile import apply_cpu_profile

    if fail_on not in ("fail", "drift"):
        raise InputError(None, f"--fail-on must be fail or drift, got {fail_on!r}")
    if pipeline not in ("aitoolkit", "server"):
        raise InputError(None, f"--pipeline must be aitoolkit or server, got {pipeline!r}")
    if kernel_search < 1:
        raise InputError(None, f"--kernel-search must be at least 1, got {kernel_search}")
    if seed_search < 1:
        raise InputError(None, f"--seed-search must be at least 1 word, got {seed_search}")
    _check_device_name(device)
    plan = build_plan(job_dir, assets)
    check_out_dir(out, plan.job_dir)
    lora_overrides = _parse_lora_overrides(lora or [], plan)
    _check_preview_headers(plan)
    defaults = Thresholds()
    thresholds = Thresholds(
        pass_min_ssim=ssim_pass if ssim_pass is not None else defaults.pass_min_ssim,
        pass_min_psnr_db=psnr_pass if psnr_pass is not None else defaults.pass_min_psnr_db,
        drift_min_ssim=ssim_drift if ssim_drift is not None else defaults.drift_min_ssim,
    )
    try:
        apply_cpu_profile(cpu_profile)
    except (ValueError, RuntimeError) as exc:
        raise InputError(None, str(exc)) from None
    from parity.check import CheckOptions
    from parity.replay import ReplayOptions

    device = _resolve_device(device)
    _check_kernels(kernels)
    _check_noise_name(noise)
    return CheckOptions(
        replay=ReplayOptions(base_model=base_model, device=device, dtype=dtype, noise_algorithm=noise,
                             lora_overrides=lora_overrides, reproduce_drift=not no_drift,
                             kernel_profile=kernels, kernel_search=kernel_search, fast=fast,
                             cuda_graphs=cuda_graphs, cpu_profile=cpu_profile),
        steps=steps, out_dir=out, assets_dir=assets, fail_on=fail_on, thresholds=thresholds,
        use_cache=not no_cache, pipeline=pipeline, diagnose=diagnose, images_dir=images, seed_search=seed_search,
    ), plan


def _check_kernels(kernels: str) -> None:
    """``--kernels`` other than auto: a known profile whose package is here (the family refuses what it cannot
    run when the model loads)."""
    if kernels == "auto":
        return
    from parity.errors import EnvironmentProblem
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


def _check_preview_headers(plan) -> None:
    """Each replayable preview is a regular image file within the pixel cap (its header only): a bad one ends
    the run with one line now rather than after the model has loaded."""
    from parity.safe_io import image_size

    samples = Path(plan.job_dir) / "samples"
    for item in plan.items:
        if item.replayable:
            image_size(samples / item.file, "preview")


def _write_reports_and_exit(report, out: Path, github: bool = False) -> None:
    """Rank 0 (or the one process): report.html, parity.json and junit.xml, the summary, the GitHub Actions step
    summary and annotations (``github``), the exit code."""
    import time

    from parity.safe_io import output_errors
    from reports import write_reports

    start = time.perf_counter()
    with output_errors(out):
        paths = write_reports(report, out)
    if os.environ.get("PARITY_TIMINGS"):
        sys.stderr.write(f"[rank 0] reports: {time.perf_counter() - start:.2f}s\n")
    _print_summary(report, paths)
    if github:
        from parity.ci import report_to_github

        if problem := report_to_github(report, paths, sys.stdout):
            err_console.print(f"[yellow]warning:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if report.nothing_checked:
        _error_line(report.nothing_checked)
    raise typer.Exit(report.exit_code)


def _check_noise_name(noise: str) -> None:
    from pipelines.common.noise import ALGORITHMS

    if noise != "auto" and noise not in ALGORITHMS:
        raise InputError(None, f"--noise must be auto or one of {', '.join(ALGORITHMS)}, got {noise!r}")


def _check_device_name(device: str) -> None:
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise InputError(None, f"--device must be auto, cpu or cuda[:N], got {device!r}")


def _resolve_device(device: str) -> str:
    _check_device_name(device)
    import torch

    from parity.errors import EnvironmentProblem

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EnvironmentProblem(None, "--device cuda was asked for but torch sees no CUDA device")
        return device
    return device


def _summary_console() -> Console:
    """Where the summary goes: stdout at the terminal's width; in a log (CI, a pipe), one wide enough that no
    line is wrapped or cut (rich would otherwise assume 80 columns)."""
    return console if console.is_terminal else Console(width=100_000, highlight=False)


def _print_summary(report, paths) -> None:
    out = _summary_console()
    table = Table(title=f"parity check: {report.job_name}", title_justify="left")
    for column in ("step", "#", "preview", "verdict", "SSIM", "PSNR", "max", "causes"):
        table.add_column(column, overflow="fold")  # never an ellipsis: a cut file name or cause cannot be found
    for item in report.items:
        outcome = item.outcome.value
        metrics = item.score.metrics if item.score else None
        table.add_row(
            str(item.step), str(item.prompt_index), escape(item.preview_file),
            f"[{VERDICT_STYLE.get(outcome, '')}]{outcome}[/]",
            f"{metrics.ssim:.4f}" if metrics else "-",
            ("inf" if metrics.psnr_db == float("inf") else f"{metrics.psnr_db:.1f}") if metrics else "-",
            str(metrics.max_abs_diff) if metrics else "-",
            ", ".join(c.code for c in item.causes) or "-",
        )
    out.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items() if v)
    out.print(escape(f"{counts}  |  noise {report.noise_algorithm} ({report.noise_algorithm_reason})"))
    if seeds := report.seed_recovery:
        out.print(escape(f"drawn seeds: {seeds['recovered']} of {seeds['drawn']} recovered from training_seed "
                         f"{seeds['training_seed']} ({seeds['replays']} replays, {seeds['cached']} from the cache, "
                         f"{seeds['seconds']:.1f} s)"), highlight=False)
        for record in seeds["previews"]:
            out.print(escape(f"  {record['preview']}: {record['summary']}"), highlight=False)
    if (cost := report.diagnosis) and cost["previews"]:
        out.print(escape(f"diagnosis: {cost['previews']} preview(s), {cost['experiments']} experiments "
                         f"({cost['per_preview']:g} per preview; {cost['replays']} replayed, {cost['cached']} from "
                         f"the cache), {cost['seconds']:.1f} s"), highlight=False)
    for cause in report.job_causes:  # proven by experiment: the answer, first
        ev = cause.evidence
        whole = " (the whole mismatch)" if ev.get("complete") else ""
        out.print(escape(f"  [proven] {cause.title}: explains {ev['explains']} of {ev['of']} mismatched preview(s)"
                         f"{whole} -> {cause.fix}"))
    for effect in report.lora_effects:
        barely = "  the LoRA barely changes the image" if effect["barely"] else ""
        out.print(escape(f"  LoRA effect at step {effect['step']}: SSIM {effect['ssim_on_vs_off']:.3f} with vs "
                         f"without, mean {effect['mean_abs_diff']:.2f} levels{barely}"))
    proven = {c.code for c in report.job_causes}
    for summary in report.causes_summary:
        if summary.code in proven or summary.code == "diagnosis_tried":
            continue
        out.print(escape(f"  [{summary.severity}] {summary.title}  ({summary.count} preview(s)) -> {summary.fix}"))
    out.print(escape(f"report: {paths['html']}  json: {paths['json']}  junit: {paths['junit']}"))
    out.print(f"exit code {report.exit_code} (--fail-on {report.fail_on})")


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
        sys.stdout.write(_json_text(report.to_dict()))
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


@app.command("causes")
def causes_command(
    code: Annotated[str | None, typer.Argument(help="A cause code (from a report, JSON or JUnit) to explain.",
                                               show_default=False)] = None,
    family: Annotated[str | None, typer.Option(help="Only the causes that concern this model family.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the catalogue (or the cause) as JSON.")] = False,
) -> None:
    """Every cause parity can name (one catalogue: lint, check, diagnosis and the server profile draw from it), or
    what one code means and what to do about it.

    Exit 0; 2 for a code or family parity does not know.
    """
    from parity import catalogue
    from pipelines.registry import families

    names = [f.name for f in families()]
    code = code.strip().lower() if code is not None else None  # SEED_CHANGED, as a CI log may shout it
    if family is not None and family not in names:
        raise InputError(None, f"--family {family!r}: parity knows {', '.join(names)}")
    if code is not None and code not in catalogue.CATALOGUE:
        import difflib

        near = difflib.get_close_matches(code, list(catalogue.CATALOGUE), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else " (parity causes lists them)"
        raise InputError(None, f"unknown cause code {code!r}{hint}")
    kinds = [catalogue.kind(code)] if code else [k for k in catalogue.KINDS if family is None or k.concerns(family)]
    rows = [{"code": k.code, "severity": k.severity, "found_by": list(catalogue.found_by(k.code)),
             "families": list(k.families) or names, "title": k.title, "explanation": k.explanation, "fix": k.fix,
             "suspects": list(k.suspects)} for k in kinds]
    if json_out:
        sys.stdout.write(_json_text(rows[0] if code else {"causes": rows}))
        return
    if code:
        row = rows[0]
        console.print(f"[bold]{row['code']}[/] ({row['severity']}; found by {', '.join(row['found_by'])}; "
                      f"{', '.join(row['families'])})", highlight=False)
        console.print(escape(row["explanation"]), highlight=False)
        console.print(escape(f"Fix: {row['fix']}"), highlight=False)
        if row["suspects"]:
            console.print(escape(f"Diagnosis tries first: {', '.join(row['suspects'])}"), highlight=False)
        return
    table = Table(title=f"parity causes ({len(rows)})", title_justify="left")
    for column in ("code", "severity", "found by", "what it is"):
        table.add_column(column, overflow="fold")
    for row in rows:
        what = row["title"].split("{")[0].rstrip(" :") if row["title"] else row["explanation"].split(". ")[0]
        table.add_row(row["code"], f"[{SEVERITY_STYLE[row['severity']]}]{row['severity']}[/]",
                      ", ".join(row["found_by"]), escape(what))
    console.print(table)


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
        sys.stdout.write(_json_text(report.to_dict()))
    else:
        _print_lora(report, top)
    raise typer.Exit(0 if report.applies else 1)


def _json_text(data) -> str:
    """Strict JSON (no NaN or Infinity tokens, which most parsers reject): non-finite numbers become null."""
    from parity.safe_io import json_safe

    return json.dumps(json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


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
        for key, count in report.nonfinite.items():
            console.print(f"  NaN/Inf: {escape(key)} ({count} values)", highlight=False, soft_wrap=True)
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


class _WarningLine(logging.Handler):
    """Library warnings (``logging``, e.g. the replay cache redoing a bad file) as one line each on stderr,
    printed through the progress bar's console so that they land above the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"[yellow]warning:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


def _usage_line(exc: typer.TyperException) -> str:
    """A click usage error as one line, with the usage hint: "No such option: --bogus (try 'parity plan --help')"."""
    ctx = getattr(exc, "ctx", None)
    hint = f" (try '{ctx.command_path} --help')" if ctx is not None else " (try 'parity --help')"
    return " ".join(exc.format_message().split()) + hint


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error is one line on stderr and its exit code (``parity.results.EXIT_CODES``).

    Usage errors exit 2 with the usage hint; a ParityError its own code (2 input, 3 environment); Ctrl-C 130
    with how to resume; anything else is a bug in parity: exit 4, the traceback only with ``--debug``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    options = args[: args.index("--")] if "--" in args else args
    debug = "--debug" in options or bool(os.environ.get("PARITY_DEBUG"))
    if "--debug" in options:
        args.remove("--debug")  # accepted anywhere: the error handling below is what reads it
    logger = logging.getLogger("parity")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine(logging.WARNING))
    try:
        code = app(args=args, prog_name="parity", standalone_mode=False)  # a typer.Exit's code is returned
    except ParityError as exc:
        _error_line(exc.line())
        code = exc.exit_code
    except typer.TyperException as exc:  # click's usage errors, vendored by typer
        if type(exc).__name__ != "NoArgsIsHelpError":  # bare `parity`: typer printed the help already
            _error_line(_usage_line(exc))
        code = 2
    except (KeyboardInterrupt, typer.Abort):
        code = INTERRUPTED
    except MemoryError:
        _error_line("out of memory")
        code = 3
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the reader went away; say nothing more)
        code = 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        where = traceback.extract_tb(exc.__traceback__)[-1]
        _error_line(f"internal error (a bug in parity, exit {INTERNAL_ERROR}): {type(exc).__name__}: {exc} "
                    f"[{Path(where.filename).name}:{where.lineno}]" + ("" if debug else "; --debug shows the traceback"))
        code = INTERNAL_ERROR
    if code == INTERRUPTED:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not print a traceback now
        err_console.print(INTERRUPTED_LINE, highlight=False, soft_wrap=True)
    sys.exit(code if isinstance(code, int) else 0)


def _error_line(text: str) -> None:
    """``error: TEXT`` as exactly one line: control characters in it (a file name with a newline) are escaped."""
    printable = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    err_console.print(f"[bold red]error:[/] {escape(printable)}", highlight=False, soft_wrap=True)
