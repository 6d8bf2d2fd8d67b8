"""``parity.json``: the whole check run as data, described by ``schemas/parity.schema.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parity.results import CheckReport
from parity.safe_io import json_safe

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "parity.schema.json"
SCHEMA_VERSION = 1


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _relative_to(path: str | None, out_dir: Path) -> str | None:
    """Paths of files written next to parity.json are stored relative to it, so the folder can move."""
    if not path:
        return path
    p = Path(path).resolve()
    return p.relative_to(out_dir).as_posix() if p.is_relative_to(out_dir) else str(p)


def report_dict(report: CheckReport, out_dir: str | Path) -> dict[str, Any]:
    out_dir = Path(out_dir).resolve()
    data = {"$schema": "parity.schema.json", "schema_version": SCHEMA_VERSION, **report.to_dict()}
    for preview in data["previews"]:
        preview["replay_png"] = _relative_to(preview["replay_png"], out_dir)
        preview["preview_path"] = _relative_to(preview["preview_path"], out_dir)
    return data


def render_json(report: CheckReport, out_dir: str | Path) -> str:
    """The text of parity.json (strict JSON: no NaN or Infinity; an identical replay has psnr_db null, and any
    other non-finite number is null too rather than a token most JSON parsers reject)."""
    return json.dumps(json_safe(report_dict(report, out_dir)), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
