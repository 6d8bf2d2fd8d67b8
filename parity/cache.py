"""The replay cache: every replay's PNG in ``<out>/replays/``, trusted again only after it is verified.

A replay's file name carries the key of everything that determines its pixels (``Replayer.cache_key``), so a
re-run, or the same command after a crash, reuses what is finished. The file cannot vouch for itself: a copy cut
short, a disk error or a hand edit (say, an all-black PNG put in its place) would otherwise decide a verdict,
and diagnosis would invent causes for it. So each PNG carries the SHA-256 of its own pixels, recorded when it
was written (a ``tEXt`` chunk, :data:`DIGEST_KEY`), and :func:`read_replay` decodes the file and compares. A file
that is truncated, altered or has no digest is not used: the caller replays it again, a warning says so, and the
new replay replaces the bad file.

Writes are atomic (a temporary file in the same folder, flushed to disk, then renamed over the name), so a run
killed half way, or two runs writing into one ``--out``, leave either the complete old file or the complete new
one, never a part. Replays get the same permissions as the reports (``0666`` less the umask: ``0644`` usually).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from parity.errors import InputError
from parity.safe_io import atomic_file, open_image, output_errors

DIGEST_KEY = "parity-pixels-sha256"
log = logging.getLogger(__name__)


def pixel_digest(pixels: np.ndarray) -> str:
    """SHA-256 of an H x W x 3 uint8 image: its shape, then its pixels in C order."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    digest = hashlib.sha256(("x".join(map(str, pixels.shape)) + ":uint8:").encode())
    digest.update(pixels.data)
    return digest.hexdigest()


def write_replay(path: str | Path, pixels: np.ndarray) -> None:
    """Write ``pixels`` (H x W x 3 uint8) as the PNG ``path`` with their digest, atomically.

    The folder is created if needed; an error writing it is an :class:`~parity.errors.OutputError` (exit 2 for
    a file in the way or a read-only folder, 3 for a full disk) and leaves no temporary file behind.
    """
    from PIL import Image, PngImagePlugin

    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(DIGEST_KEY, pixel_digest(pixels))
    with output_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(handle, format="PNG", pnginfo=info)


def replay_problem(path: str | Path) -> tuple[np.ndarray | None, str | None]:
    """``(pixels, None)`` for a cached replay that verifies, ``(None, why)`` for one that does not, and
    ``(None, None)`` when there is no file."""
    path = Path(path)
    if not os.path.lexists(path):
        return None, None
    try:
        with open_image(path, "cached replay") as image:
            recorded = image.info.get(DIGEST_KEY)
            if image.format != "PNG" or recorded is None:
                return None, "has no pixel digest (not written by this parity)"
            pixels = np.asarray(image.convert("RGB"))
    except InputError as exc:
        return None, exc.problem
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"cannot be decoded ({exc})"
    if pixel_digest(pixels) != recorded:
        return None, "does not match the digest recorded when it was written (altered since)"
    return pixels, None


def read_replay(path: str | Path) -> np.ndarray | None:
    """The pixels of the cached replay ``path`` (H x W x 3 uint8) if it exists and verifies, else None.

    A file that exists but does not verify (truncated, altered, no digest, not an image, not a regular file)
    is never used: a warning names it and says why, and the caller replays it again.
    """
    pixels, problem = replay_problem(path)
    if problem is not None:
        log.warning("replay cache: %s %s; replaying it again", path, problem)
    return pixels
