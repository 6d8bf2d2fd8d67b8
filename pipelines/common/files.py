"""Model folders on disk: found locally or in the Hugging Face cache (never downloaded), identified, read safely."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.family import ModelDirError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local folder as it is, else a Hugging Face repo id looked up in the local cache (never downloaded)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelDirError(path, "is a file, expected a diffusers-layout model folder")
    text = str(name_or_path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception:
            raise ModelDirError(
                text, "not a folder and not in the local Hugging Face cache (parity never downloads)", missing=True
            ) from None
    raise ModelDirError(path, "model folder not found", missing=True)


def model_fingerprint(root: Path) -> str:
    """Identity of a base model folder: every file's relative path, size and modification time."""
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            entries.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def safetensors_files(folder: Path, stem: str) -> list[Path]:
    """The folder's safetensors weights (single file or shards), refusing pickle-only folders."""
    if not folder.is_dir():
        raise ModelDirError(folder, "missing subfolder")
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelDirError(pickles[0], "pickle checkpoint: parity loads safetensors only (convert it first)")
    raise ModelDirError(folder / f"{stem}.safetensors", "no safetensors weights found")


def read_config(path: Path) -> dict:
    """A model config JSON file, or ModelDirError naming it."""
    if not path.is_file():
        raise ModelDirError(path, "missing config")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(path, f"not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(data, dict):
        raise ModelDirError(path, "not a JSON object")
    return data


def transformer_config(root: Path, class_name: str, otherwise: str) -> dict:
    """``root/transformer/config.json``, checked to build ``class_name``; ModelDirError (one line) naming the file
    otherwise, ending with ``otherwise`` (what a wrong class means for the family)."""
    path = root / "transformer" / "config.json"
    if not path.is_file():
        raise ModelDirError(path, "missing transformer config")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelDirError(path, f"unreadable ({exc})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != class_name:
        raise ModelDirError(path, f"transformer class is {name!r}, not {class_name} ({otherwise})")
    return config


def stopwatch(timings: dict[str, float]) -> Callable:
    """``timed(name, fn, *args)``: ``fn(*args)``, its seconds recorded as ``timings[name]`` (a load's parts)."""

    def timed(name: str, fn: Callable, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[name] = time.perf_counter() - start
        return result

    return timed
