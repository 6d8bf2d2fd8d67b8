"""Rendering of check results: HTML, JSON and JUnit. Knows nothing about torch.

``write_reports(report, out_dir)`` writes ``report.html``, ``parity.json`` (+ its schema) and ``junit.xml``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from parity.errors import InputError
from parity.results import CheckReport
from reports.html import render_html
from reports.json_report import SCHEMA_PATH, render_json
from reports.junit import render_junit

__all__ = ["write_reports", "write_atomic"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old file or the complete new one, never a part.

    The bytes go to a temporary file in the same folder (same file system), are flushed to disk, then
    ``os.replace`` swaps it in.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; a report is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_out_dir(out_dir: Path, job_dir: Path) -> None:
    """Reports never go inside the job folder: ai-toolkit or a sync tool may own it, and a later check
    would read the report's images as if they were part of the job."""
    if out_dir == job_dir or out_dir.is_relative_to(job_dir):
        raise InputError(
            out_dir, f"the report folder is inside the job folder {job_dir}; choose another --out"
        )


def write_reports(report: CheckReport, out_dir: str | Path) -> dict[str, Path]:
    """Write every report file into ``out_dir`` atomically; returns their paths by kind.

    Kinds: ``html`` (report.html), ``json`` (parity.json), ``schema`` (parity.schema.json), ``junit``
    (junit.xml). Everything is rendered before the first file is written, so a rendering error leaves the
    folder as it was.
    """
    out = Path(out_dir).resolve()
    _check_out_dir(out, Path(report.job_dir).resolve())
    if out.exists() and not out.is_dir():
        raise InputError(out, "the report folder exists and is not a folder")
    contents = {
        "html": ("report.html", render_html(report).encode("utf-8")),
        "json": ("parity.json", render_json(report, out).encode("utf-8")),
        "schema": ("parity.schema.json", SCHEMA_PATH.read_bytes()),
        "junit": ("junit.xml", render_junit(report).encode("utf-8")),
    }
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, (name, data) in contents.items():
        write_atomic(out / name, data)
        written[kind] = out / name
    return written
