"""``parity check`` under GitHub Actions: a markdown step summary and an error annotation per failing preview.

GitHub reads both from the step itself: the summary is markdown appended to the file ``$GITHUB_STEP_SUMMARY``
names (shown on the run's page), an annotation is a workflow command line on stdout,
``::error file=PATH,title=TITLE::MESSAGE`` (shown on the run and, for a file in the repository, beside it).
GitHub documents the escaping: in the message ``%``, CR and LF become ``%25``, ``%0D`` and ``%0A``; in a
property (file, title) ``:`` and ``,`` too, as ``%3A`` and ``%2C``. It shows at most 10 error annotations per
step, so they come worst first; the summary lists every preview that needs attention, up to ``SUMMARY_ROWS``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from parity.results import CheckReport, Outcome, PreviewResult

SUMMARY_ROWS = 100  # GitHub caps a step summary at 1 MiB; a row is ~300 bytes
VERDICT_MARK = {"EXACT": "🟢", "PASS": "🟢", "DRIFT": "🟡", "FAIL": "🔴", "SKIPPED": "⚪", "ERROR": "🟣"}


def github_wanted(flag: bool | None, env: Mapping[str, str] | None = None) -> bool:
    """``--github``/``--no-github`` as given; otherwise whether this runs under GitHub Actions."""
    if flag is not None:
        return flag
    return (os.environ if env is None else env).get("GITHUB_ACTIONS") == "true"


def escape_data(text: str) -> str:
    """A workflow command's message, escaped as GitHub's runner unescapes it."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value (file, title): the message's escapes plus ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _metrics_line(item: PreviewResult) -> str:
    if item.outcome is Outcome.ERROR:
        return f"the replay crashed: {item.error}"
    m = item.score.metrics
    psnr = "inf" if math.isinf(m.psnr_db) else f"{m.psnr_db:.2f} dB"
    return f"{item.outcome.value}: SSIM {m.ssim:.4f}, PSNR {psnr}, max difference {m.max_abs_diff} of 255"


def annotation_path(preview: Path | None, workspace: Path) -> str:
    """The preview as GitHub names files: relative to the workspace (the checkout) when inside it."""
    if preview is None:
        return ""
    path = Path(preview).resolve()
    return path.relative_to(workspace).as_posix() if path.is_relative_to(workspace) else str(path)


def annotations(report: CheckReport, workspace: Path) -> list[str]:
    """One ``::error`` command per preview that fails the run, worst first."""
    failing = [i for i in report.items if report.is_failure(i)]
    failing.sort(key=lambda i: (i.outcome.rank, i.score.metrics.ssim if i.score else -1.0, i.preview_file))
    lines = []
    for item in failing:
        message = [_metrics_line(item), f"step {item.step}, prompt {item.prompt_index}: {item.prompt}"]
        message += [f"[{c.severity}] {c.title}. Fix: {c.fix}" for c in item.causes]
        props = [f"file={escape_property(annotation_path(item.preview_path, workspace))}"] if item.preview_path else []
        props.append(f"title={escape_property(f'parity {item.outcome.value}: {item.preview_file}')}")
        lines.append(f"::error {','.join(props)}::{escape_data(chr(10).join(message))}")
    return lines


def _md(text: str) -> str:
    """User text (prompts, causes, file names) as plain markdown in one table cell: no markup, no HTML."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_[]|#~":
        text = text.replace(ch, "\\" + ch)
    return text


def _code(text: str) -> str:
    """A file name or cause code as inline code (readable in the raw file too); plain text if it holds a backtick."""
    text = " ".join(str(text).split())
    return _md(text) if "`" in text else "`" + text.replace("|", "\\|") + "`"


def step_summary(report: CheckReport, paths: Mapping[str, Path]) -> str:
    """The step summary: verdict of the run, the counts, every preview that needs attention, the causes."""
    counts = report.counts
    failed = report.exit_code != 0
    head = "❌ Parity failed" if failed else "✅ Parity holds"
    lines = [
        f"## {head}: {_code(report.job_name)}",
        "",
        f"{counts['EXACT']} exact, {counts['PASS']} pass, {counts['DRIFT']} drift, {counts['FAIL']} fail of "
        f"{len(report.items)} previews"
        + (f", {counts['SKIPPED']} skipped" if counts["SKIPPED"] else "")
        + (f", {counts['ERROR']} crashed" if counts["ERROR"] else "")
        + f". Exit code {report.exit_code} (`--fail-on {report.fail_on}`).",
        "",
        "| " + " | ".join(counts) + " |",
        "|" + "---:|" * len(counts),
        "| " + " | ".join(str(n) for n in counts.values()) + " |",
        "",
    ]
    attention = [i for i in report.items if i.outcome not in (Outcome.EXACT, Outcome.PASS)]
    attention.sort(key=lambda i: (i.outcome.rank, i.score.metrics.ssim if i.score else -1.0, i.preview_file))
    if attention:
        lines += ["### Previews that need attention", "",
                  "| | verdict | preview | step | prompt | SSIM | PSNR | causes |", "|---|---|---|---:|---:|---:|---:|---|"]
        for item in attention[:SUMMARY_ROWS]:
            m = item.score.metrics if item.score else None
            psnr = ("inf" if math.isinf(m.psnr_db) else f"{m.psnr_db:.1f}") if m else "–"
            why = ", ".join(_code(c.code) for c in item.causes) or _md(item.reason or item.error or "")
            lines.append(
                f"| {VERDICT_MARK[item.outcome.value]} | {item.outcome.value}"
                f"{' (fails the run)' if report.is_failure(item) else ''} | {_code(item.preview_file)} | {item.step} "
                f"| {item.prompt_index} | {f'{m.ssim:.4f}' if m else '–'} | {psnr} | {why} |")
        if len(attention) > SUMMARY_ROWS:
            lines.append(f"\n{len(attention) - SUMMARY_ROWS} more in the report.")
        lines.append("")
    if report.causes_summary:
        lines += ["### Causes", ""]
        lines += [f"- **{s.severity}** {_md(s.title)} (`{s.code}`, {s.count} preview(s)). Fix: {_md(s.fix)}"
                  for s in report.causes_summary]
        lines.append("")
    t = report.thresholds
    lines += [
        f"PASS needs SSIM ≥ {t.pass_min_ssim:g} and PSNR ≥ {t.pass_min_psnr_db:g} dB, DRIFT SSIM ≥ "
        f"{t.drift_min_ssim:g}. Noise {_md(report.noise_algorithm)}, kernels {_md(report.kernels)}, "
        f"{_md(report.device)} / {_md(report.dtype)}.",
        "",
        f"Report: `{paths['html']}` (with `parity.json` and `junit.xml`; upload the folder as an artifact).",
        "",
    ]
    return "\n".join(lines)


def report_to_github(report: CheckReport, paths: Mapping[str, Path], stdout: TextIO,
                     env: Mapping[str, str] | None = None) -> str | None:
    """Append the step summary to ``$GITHUB_STEP_SUMMARY`` and print the annotations to ``stdout``; returns a
    problem to warn about (no summary file) or None."""
    env = os.environ if env is None else env
    workspace = Path(env.get("GITHUB_WORKSPACE") or os.getcwd()).resolve()
    for line in annotations(report, workspace):
        stdout.write(line + "\n")
    stdout.flush()
    target = env.get("GITHUB_STEP_SUMMARY")
    if not target:
        return "--github: GITHUB_STEP_SUMMARY is not set, so no step summary was written"
    try:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(step_summary(report, paths) + "\n")
    except OSError as exc:
        return f"--github: cannot append the step summary to {target}: {exc.strerror or exc}"
    return None
