"""Reading files that came from another machine, and writing the report folder, without surprises.

Job folders arrive from other machines, half-finished trainings and hand edits, and ``parity``'s exit code drives
CI. Every reader here either returns what was asked for or raises one :class:`~parity.errors.InputError` naming
the file and the problem; none of them can hang, exhaust memory or print a traceback:

- :func:`open_regular` refuses anything that is not a regular file (a FIFO, a device, a socket) *without*
  blocking on it: ``open()`` on a FIFO waits for a writer forever.
- :func:`load_yaml` bounds a YAML document: its size on disk, how far its anchors and aliases expand (an "alias
  bomb" of a few hundred bytes expands to billions of values), recursive aliases and nesting depth.
- :func:`open_image` checks the pixel count in the image header against :data:`MAX_IMAGE_PIXELS` before a pixel
  is decoded, and turns Pillow's own ``DecompressionBombError`` (not an ``OSError``) into one line.
- :func:`output_errors` maps what goes wrong while writing ``--out`` (a file where a folder should be, read-only,
  disk full) to an :class:`~parity.errors.OutputError`: exit 2 when the folder is the problem, 3 when the
  machine is. :func:`check_out_dir` finds the usual ones before any work is done.
- :func:`json_safe` makes values strict JSON: NaN and infinities become null (``json.dumps(allow_nan=False)``
  then never fails, and no reader meets a bare ``NaN`` token).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from parity.errors import InputError, OutputError

# The largest image parity decodes: 8192 x 8192 = 67 MP (201 MB as 8-bit RGB, about 1.6 GB as the float maps
# the scores compute). ai-toolkit's image models generate at about 1 MP and resize a preview back to the
# requested size, which config validation holds to MAX_IMAGE_SIDE on each side, so no preview or reference
# image of a real job comes near it. Pillow's own guard (89 MP, an error only above 179 MP) is looser.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE

# A job config is a few kilobytes; these bounds are three orders of magnitude above any real one.
MAX_CONFIG_BYTES = 8 * 1024 * 1024
MAX_YAML_VALUES = 100_000  # values (mappings, lists, scalars) after every alias is expanded
MAX_YAML_TEXT = 16 * 1024 * 1024  # characters of scalar text after every alias is expanded

# Errors of the machine rather than of the folder asked for: exit 3 (environment), the rest exit 2.
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


# ---------------------------------------------------------------------------------------------------------
# reading


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular(path: str | Path, what: str = "file") -> Iterator[IO[bytes]]:
    """Open ``path`` for reading in binary mode if it is a regular file (links followed); InputError otherwise.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO is refused at
    once (a plain ``open`` would wait for a writer) and nothing can swap the file between check and read.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(path, f"{what} not found") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the {what}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(path, f"the {what} is {file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def regular_file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file that can be read (None when it is), without opening it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found" if not os.path.islink(path) else "a broken link"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None if stat.S_ISREG(mode) else f"{file_kind(mode)}, not a regular file"


def read_text(path: str | Path, what: str = "file", limit: int = MAX_CONFIG_BYTES) -> str:
    """A regular text file of at most ``limit`` bytes, decoded as UTF-8."""
    path = Path(path)
    with open_regular(path, what) as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise InputError(path, f"cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(path, f"the {what} is larger than {limit // (1024 * 1024)} MiB: not a job config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"the {what} is not UTF-8 text (byte {exc.start})") from None


def load_yaml(text: str, path: str | Path) -> Any:
    """``yaml.safe_load`` with bounds: InputError for an alias bomb, a recursive alias or absurd nesting.

    Anchors and aliases are fine (``<<: *defaults`` is common); a document whose aliases expand to more than
    :data:`MAX_YAML_VALUES` values or :data:`MAX_YAML_TEXT` characters is refused before anything walks it.
    The check counts each shared node once per use without expanding it, so it is as fast as parsing.
    Syntax errors propagate as ``yaml.YAMLError``.
    """
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            _check_expansion(node, Path(path))
            return node

    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (a SafeLoader)
    except RecursionError:
        raise InputError(path, "YAML nested too deeply to be a job config") from None


def _check_expansion(root, path: Path) -> None:
    """Refuse a composed YAML node graph whose full expansion is too large, or that contains itself."""
    import yaml

    def children(node) -> list:
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, characters) in its expansion
    entered: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        key = id(node)
        if leaving:
            entered.discard(key)
            values, chars = 1, len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            for child in children(node):
                values, chars = values + sizes[id(child)][0], chars + sizes[id(child)][1]
            if values > MAX_YAML_VALUES or chars > MAX_YAML_TEXT:
                raise InputError(
                    path, f"YAML aliases expand to more than {MAX_YAML_VALUES} values or {MAX_YAML_TEXT // 2**20} "
                    "MiB of text (an alias bomb?); refusing to read it")
            sizes[key] = (values, chars)
            continue
        if key in sizes:
            continue
        if key in entered:
            raise InputError(path, "YAML alias refers to a value that contains it (a recursive alias)")
        entered.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children(node) if id(child) not in sizes)


def parse_json(text: str, path: str | Path) -> Any:
    """``json.loads`` with an InputError naming the file for bad JSON or absurd nesting."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise InputError(path, "JSON nested too deeply to be a job config") from None


@contextlib.contextmanager
def open_image(path: str | Path, what: str = "image") -> Iterator[Any]:
    """A Pillow image of ``path``, header read and checked, pixels not yet decoded.

    InputError for a file that is not regular, not an image, or whose header gives more than
    :data:`MAX_IMAGE_PIXELS` pixels; decoding later (``convert``, ``load``) may still raise ``OSError`` for a
    truncated file.
    """
    from PIL import Image

    path = Path(path)
    with open_regular(path, what) as handle, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(handle)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            pixels = re.search(r"\d+", str(exc))
            raise InputError(path, f"the {what} is too large to decode ({pixels[0] if pixels else 'too many'} "
                                   f"pixels); parity's cap is {MAX_IMAGE_PIXELS} ({_side_text()})") from None
        except Image.UnidentifiedImageError:
            raise InputError(path, f"cannot read the {what}: not an image Pillow can read") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(path, f"cannot read the {what}: {exc}") from None
        with image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(path, f"the {what} is {width}x{height} = {width * height} pixels, over parity's "
                                       f"cap of {MAX_IMAGE_PIXELS} ({_side_text()})")
            yield image


def image_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """``(width, height)`` from the header; InputError as :func:`open_image`."""
    with open_image(path, what) as image:
        return image.size


def _side_text() -> str:
    return f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, for ``json.dumps(..., allow_nan=False)``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# writing the report folder


def output_error(path: str | Path, exc: OSError, what: str = "the report folder") -> OutputError:
    """One line for an OSError met while writing ``what`` at ``path`` (exit 3 for the machine's errors)."""
    reason = exc.strerror or str(exc)
    if exc.errno in _MACHINE_ERRNOS:
        return OutputError(path, f"cannot write {what}: {reason}", exit_code=3)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return OutputError(path, f"cannot write {what}: a file or folder is in the way ({reason})")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(path, f"cannot write {what}: {reason} (read-only?)")
    return OutputError(path, f"cannot write {what}: {reason}")


@contextlib.contextmanager
def output_errors(path: str | Path, what: str = "the report folder") -> Iterator[None]:
    """Turn an OSError raised inside the block into an :class:`OutputError` for ``what`` at ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise output_error(path, exc, what) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives an ordinary file: the reports' and the replays' mode


@contextlib.contextmanager
def atomic_file(path: str | Path, what: str = "the report folder") -> Iterator[IO[bytes]]:
    """A binary handle whose bytes become ``path`` only when the block completes: written to a temporary file
    in the same folder, flushed to disk, given :data:`FILE_MODE`, then renamed over ``path``. Readers see the
    old file or the whole new one; on any error (OutputError for an OSError) nothing is left behind."""
    import tempfile

    path = Path(path)
    with output_errors(path, what):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp creates 0600
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def check_out_dir(out_dir: str | Path, job_dir: str | Path | None = None) -> None:
    """Fail now, not after the replays, when ``out_dir`` cannot become the report folder; writes nothing.

    It must not be inside ``job_dir`` (parity never writes there), and it must be a folder this process can
    create files in, or not exist yet under such a folder. ``os.access`` answers for the kernel: permission
    bits, a read-only mount, an immutable folder.
    """
    out = Path(out_dir).absolute()
    if job_dir is not None:
        job = Path(job_dir).resolve()
        if out.resolve() == job or out.resolve().is_relative_to(job):
            raise InputError(out_dir, "the report folder is inside the job folder; parity never writes there "
                                      "(use --out)")
    existing = out
    while not existing.exists() and not existing.is_symlink() and existing.parent != existing:
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise OutputError(out_dir, f"cannot write the report folder: {existing} is a broken link")
    if not existing.is_dir():
        raise OutputError(out_dir, f"cannot write the report folder: {existing} is a file, not a folder; choose "
                                   "another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(out_dir, f"cannot write the report folder: {existing} is read-only for this user; "
                                   "choose another --out")
