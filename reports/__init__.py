"""Rendering of check results: HTML, JSON and JUnit. Knows nothing about torch.

``write_reports(report, out_dir)`` writes ``report.html``, ``parity.json`` (+ its schema) and ``junit.xml``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from parity.errors import InputError
from parity.results import CheckReport
from reports.html import CARDS_FOLDER, html_bytes
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
    tmp = _staged(path, [data])
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _staged(path: Path, chunks: Iterable[bytes]) -> str:
    """``chunks`` written to a new temporary file next to ``path`` and flushed to disk; returns its name (the
    caller swaps it in with ``os.replace`` or deletes it). Nothing is left behind on an error."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; a report is an ordinary file
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


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
    (junit.xml). Every file is complete in a temporary file before the first is replaced, so a rendering error
    leaves the folder as it was. Card images that ``parity check`` made for the report (``.parity-cards/``) are
    deleted once they are in report.html.
    """
    out = Path(out_dir).resolve()
    _check_out_dir(out, Path(report.job_dir).resolve())
    if out.exists() and not out.is_dir():
        raise InputError(out, "the report folder exists and is not a folder")
    contents = {
        "json": ("parity.json", render_json(report, out).encode("utf-8")),
        "schema": ("parity.schema.json", SCHEMA_PATH.read_bytes()),
        "junit": ("junit.xml", render_junit(report).encode("utf-8")),
    }
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged: dict[str, tuple[str, Path]] = {}
    try:
        # report.html goes straight to its temporary file as it is rendered: with its images inlined it is
        # tens of megabytes for a big job, never needed in memory at once.
        html = out / "report.html"
        staged["html"] = (_staged(html, html_bytes(report, out)), html)
        for kind, (name, data) in contents.items():
            staged[kind] = (_staged(out / name, [data]), out / name)
        written = {}
        for kind, (tmp, path) in staged.items():
            os.replace(tmp, path)
            written[kind] = path
    except BaseException:
        for tmp, _ in staged.values():
            Path(tmp).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty
        raise
    _consume_card_files(report, out)
    return written


def _consume_card_files(report: CheckReport, out: Path) -> None:
    """Delete the card images ``parity check`` made for this report (now inlined in report.html)."""
    folder = out / CARDS_FOLDER
    for item in report.items:
        if item.card_file is not None and Path(item.card_file).parent == folder:
            Path(item.card_file).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only if nothing else is in it
