"""``pytest --parity JOB_DIR``: one ``parity check``, one test per preview, for CI that is pytest on a GPU runner.

    pytest --parity /jobs/my_lora --parity-base-model /models/OmniGen2 --parity-args "--steps latest --fail-on drift"

Loaded through the ``pytest11`` entry point; without ``--parity`` it adds nothing. The preview tests are collected
from the job's plan (no model, so ``--collect-only`` is instant and ``-k`` picks previews by file name). The first
preview test that runs starts ``parity check`` once, in its own process (the model's memory and the CPU kernel
settings stay out of the test session), writing the usual report folder (``--out`` in ``--parity-args``, else
``parity-report`` where pytest was started); every preview test then reads its result from that ``parity.json``.
A preview test fails as the check's exit code counts it (FAIL or a crashed replay; DRIFT too with
``--fail-on drift``), is skipped when the preview cannot be replayed, and passes otherwise. When the check cannot run
at all (exit 2 or 3: a bad argument, no base model), every preview test fails with its error line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from parity.results import CheckReport, Outcome, PreviewResult


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "preview parity of an ai-toolkit LoRA job (parity check)")
    group.addoption("--parity", metavar="JOB_DIR", default=None,
                    help="Run `parity check JOB_DIR` and add one test per preview.")
    group.addoption("--parity-base-model", metavar="PATH", default=None,
                    help="--base-model for the check (folder or Hugging Face id).")
    group.addoption("--parity-args", metavar="ARGS", default="",
                    help='More `parity check` arguments, as one shell-quoted string: "--steps latest --fail-on drift".')


def _check_arguments(config: pytest.Config) -> tuple[list[str], argparse.Namespace]:
    """The ``parity check`` command line after the program, and the few of its options this plugin reads."""
    job = Path(config.getoption("--parity")).expanduser()
    extra = shlex.split(config.getoption("--parity-args") or "")
    reader = argparse.ArgumentParser(add_help=False)
    reader.add_argument("--out")
    reader.add_argument("--steps", default="all")
    reader.add_argument("--assets")
    known, _ = reader.parse_known_args(extra)
    args = ["check", str(job)]
    if base := config.getoption("--parity-base-model"):
        args += ["--base-model", base]
    if known.out is None:
        known.out = str(Path(config.invocation_params.dir) / "parity-report")
        args += ["--out", known.out]
    return args + extra, known


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect, so they apply to the preview tests too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--parity") is None:
        return
    job = ParityJob.from_parent(session, name="parity", nodeid="parity", config_args=_check_arguments(config))
    previews = job.collect()
    # Reported like any collected node: the terminal's count, --collect-only and junitxml see the previews.
    config.hook.pytest_collectreport(
        report=pytest.CollectReport(job.nodeid, "passed", None, previews))
    items.extend(previews)


class CheckNotRun(Exception):
    """``parity check`` ended without writing a report (usage, input or environment error, or a crash)."""


class PreviewFailed(Exception):
    """The preview's verdict fails the run (per ``--fail-on``)."""


class ParityJob(pytest.Collector):
    """The job folder: one ``parity check`` run (on first use), one test per preview of its plan."""

    def __init__(self, *, config_args: tuple[list[str], argparse.Namespace], **kwargs):
        super().__init__(**kwargs)
        self.args, self.known = config_args
        self._outcome: CheckReport | CheckNotRun | None = None

    def collect(self) -> list[PreviewTest]:
        from parity.check import select_items
        from parity.errors import ParityError
        from parity.plan import build_plan

        job = Path(self.args[1])
        try:
            plan = build_plan(job, Path(self.known.assets) if self.known.assets else None)
            previews = [i.file for i in select_items(plan, self.known.steps)]
        except ParityError as exc:
            raise pytest.UsageError(f"--parity: {exc.line()}") from None
        return [PreviewTest.from_parent(self, name=f"{plan.job_name}/{file}", preview=file) for file in previews]

    def report(self) -> CheckReport:
        """The check's report, from running it the first time (a check that cannot run raises CheckNotRun)."""
        if self._outcome is None:
            self._outcome = self._run()
        if isinstance(self._outcome, CheckNotRun):
            raise self._outcome
        return self._outcome

    def _run(self) -> CheckReport | CheckNotRun:
        out = Path(self.known.out)
        if not out.is_absolute():
            out = Path(self.config.invocation_params.dir) / out
        report_json = out / "parity.json"
        before = report_json.stat().st_mtime_ns if report_json.exists() else None
        command = [sys.executable, "-m", "parity", *self.args]
        # stderr (progress lines, an error) is shown as it comes and kept for the failure message; stdout (the
        # summary table) goes where pytest's capture puts it.
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace",
                                   cwd=self.config.invocation_params.dir, env=os.environ.copy())
        tail: list[str] = []
        for line in process.stderr:
            sys.stderr.write(line)
            tail = (tail + [line.rstrip("\n")])[-20:]
        code = process.wait()
        written = report_json.exists() and report_json.stat().st_mtime_ns != before
        if code not in (0, 1) or not written:
            why = "\n".join(tail) or "(nothing on stderr)"
            return CheckNotRun(f"`{shlex.join(['parity', *self.args])}` exited {code} without a report:\n{why}")
        return CheckReport.from_dict(json.loads(report_json.read_text(encoding="utf-8")))


class PreviewTest(pytest.Item):
    """One preview: passes, fails or is skipped by its verdict in the check's report."""

    def __init__(self, *, preview: str, **kwargs):
        super().__init__(**kwargs)
        self.preview = preview

    def runtest(self) -> None:
        report = self.parent.report()
        item = next((i for i in report.items if i.preview_file == self.preview), None)
        if item is None:
            pytest.skip("not in the check's report")
        self.user_properties.append(("verdict", item.outcome.value))
        if item.score is not None:
            self.user_properties.append(("ssim", f"{item.score.metrics.ssim:.5f}"))
        if item.outcome is Outcome.SKIPPED:
            pytest.skip(item.reason or "not replayed")
        if report.is_failure(item):
            raise PreviewFailed(_failure_text(report, item))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, PreviewFailed | CheckNotRun):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return Path(self.parent.args[1]), None, f"parity {self.preview}"


def _failure_text(report: CheckReport, item: PreviewResult) -> str:
    if item.outcome is Outcome.ERROR:
        lines = [f"{item.preview_file}: the replay crashed: {item.error}"]
    else:
        m, t = item.score.metrics, report.thresholds
        psnr = "inf" if math.isinf(m.psnr_db) else f"{m.psnr_db:.2f} dB"
        lines = [f"{item.preview_file}: {item.outcome.value} (--fail-on {report.fail_on}): SSIM {m.ssim:.4f}, "
                 f"PSNR {psnr}, max difference {m.max_abs_diff} of 255",
                 f"PASS needs SSIM >= {t.pass_min_ssim:g} and PSNR >= {t.pass_min_psnr_db:g} dB; "
                 f"DRIFT needs SSIM >= {t.drift_min_ssim:g}"]
    lines.append(f"step {item.step}, prompt {item.prompt_index}: {item.prompt}")
    lines += [f"[{c.severity}] {c.title} ({c.code}). Fix: {c.fix}" for c in item.causes]
    return "\n".join(lines)
