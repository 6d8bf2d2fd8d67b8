"""The hostile-input corpus of ``test_hostile.py``: broken or hostile job folders, command lines, output folders
and files, each as a :class:`Case` that builds its inputs in its own folder and says what ``parity`` must answer.

Every case runs ``python -m parity`` in a subprocess on a copy of the tiny ``og2_basic`` oracle job. The runner
(:func:`run_case`) hashes the case's whole folder before and after (contents, types, link targets, modes and
mtimes) so that the job folder coming out byte-identical and nothing being written outside ``--out`` (including
``$HOME`` and ``$TMPDIR``, both inside the case folder) are one comparison. Payloads that would create
``PWNED`` if anything were executed are caught by the same comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fixtures import ORACLE_DIR

TINY = ORACLE_DIR / "tiny_omnigen2"
SOURCE_JOB = ORACLE_DIR / "jobs" / "og2_basic"
PREVIEW_0 = "1795681192170__000000000_0.jpg"  # a step-0 preview of og2_basic
CHECKPOINT_2 = "og2_basic_000000002.safetensors"
CASE_TIMEOUT_S = 90


# ---------------------------------------------------------------------------------------------------------
# a case's folder


@dataclass
class Ctx:
    """One case's folder: ``job/`` (a copy of og2_basic), ``out`` (the legitimate --out, may be written),
    ``home/`` and ``tmp/`` (the subprocess's HOME and TMPDIR: nothing may appear there)."""

    root: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def job(self) -> Path:
        return self.root / "job"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def samples(self) -> Path:
        return self.job / "samples"

    def prepare(self) -> None:
        shutil.copytree(SOURCE_JOB, self.job, ignore=shutil.ignore_patterns("optimizer.pt"))
        for name in ("home", "tmp"):
            (self.root / name).mkdir()

    def config(self) -> dict:
        return yaml.safe_load((self.job / "config.yaml").read_text())

    def save_config(self, raw: dict) -> None:
        (self.job / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def edit(self, change: Callable[[dict], object]) -> None:
        """Apply ``change`` to the training process of config.yaml, as a user editing it would."""
        raw = self.config()
        change(raw["config"]["process"][0])
        self.save_config(raw)

    def env(self) -> dict[str, str]:
        return {**os.environ, "COLUMNS": "200", "HOME": str(self.root / "home"), "TMPDIR": str(self.root / "tmp"),
                "PARITY_DEBUG": ""}


def check_argv(ctx: Ctx, *extra: str | Path, out: Path | None = None) -> list[str]:
    """``parity check`` on the case's job with the tiny model, the AVX2 CPU profile and ``--out``."""
    return ["check", str(ctx.job), "--base-model", str(TINY), "--cpu-profile", "avx2",
            "--out", str(out or ctx.out), *map(str, extra)]


def tree_state(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed, FIFOs never opened): type, mode, mtime and, for a
    regular file, the SHA-256 of its bytes; for a link its target. ``skip``'s subtree is left out."""
    state = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                detail = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                detail = os.readlink(path)
            else:
                detail = ""
            state[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode),
                                                  info.st_mtime_ns, detail)
    return state


# ---------------------------------------------------------------------------------------------------------
# hostile files


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (valid CRC) over a 1x1 image's data: a decompression bomb
    as far as any header reader can tell."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = buffer.getvalue()
    at = data.index(b"IHDR")
    body = struct.pack(">II", width, height) + data[at + 12 : at + 17]
    return data[:at] + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + data[at + 21 :]


def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 marker is rewritten to claim ``width`` x ``height``."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" YAML: ``width ** levels`` strings from a few hundred bytes."""
    lines = [f"lol0: &lol0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"lol{level}: &lol{level} [{', '.join([f'*lol{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def rewrite_lora(source: Path, target: Path, change: Callable[[dict], dict]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(change(tensors), str(target), metadata=metadata)


def nan_lora(ctx: Ctx) -> Path:
    """og2_basic's step-2 LoRA with 2 NaNs and 1 Inf in one B matrix."""
    def poison(tensors):
        key = "diffusion_model.layers.0.attn.to_q.lora_B.weight"
        bad = tensors[key].clone()
        bad.view(-1)[:3] = bad.new_tensor([float("nan"), float("nan"), float("inf")])
        return tensors | {key: bad}

    target = ctx.root / "nan.safetensors"
    rewrite_lora(ctx.job / CHECKPOINT_2, target, poison)
    return target


def vector_alpha_lora(ctx: Ctx) -> Path:
    import torch

    target = ctx.root / "alpha.safetensors"
    rewrite_lora(ctx.job / CHECKPOINT_2, target,
                 lambda t: t | {"diffusion_model.layers.0.attn.to_q.alpha": torch.ones(4)})
    return target


class _Payload:
    """Unpickling this runs a shell command: a pickle LoRA must never be loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_lora(ctx: Ctx, name: str = "evil.pt") -> Path:
    path = ctx.root / name
    path.write_bytes(pickle.dumps(_Payload(ctx.root / "PWNED")))
    return path


def safetensors_with_header(ctx: Ctx, header: bytes, length: int | None = None, name="bad.safetensors") -> Path:
    path = ctx.root / name
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header)
    return path


def mkfifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def bind_socket(path: Path, ctx: Ctx) -> Path:
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    ctx.cleanups.append(sock.close)
    return path


# ---------------------------------------------------------------------------------------------------------
# privileged helpers (root: mounts and the immutable flag); a case that needs one is skipped without it


class Unavailable(Exception):
    """The machine cannot build this case (not root, no mount): the test is skipped."""


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise Unavailable(f"{' '.join(command)}: {result.stderr.strip()}")


def immutable(ctx: Ctx, path: Path) -> Path:
    """``path`` (a folder) made immutable: not even root can create a file in it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        ctx.cleanups.append(lambda: path.chmod(0o755))
        return path
    _run("chattr", "+i", str(path))
    ctx.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=False))
    return path


def tmpfs(ctx: Ctx, path: Path, full: bool = False, read_only: bool = False) -> Path:
    """A 256 KiB tmpfs at ``path``: filled to the last byte (``full``: ENOSPC) or remounted read-only."""
    if os.geteuid() != 0:
        raise Unavailable("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    # Four inodes: the root, the filler and two more, used up below: not even an empty file can be created.
    _run("mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=4", "tmpfs", str(path))
    ctx.cleanups.append(lambda: subprocess.run(["umount", "-l", str(path)], check=False))
    if full:
        with open(path / "filler", "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            except OSError:
                pass
        for i in range(8):
            try:
                (path / f"inode{i}").touch()
            except OSError:
                break
    if read_only:
        _run("mount", "-o", "remount,ro", str(path))
    return path


# ---------------------------------------------------------------------------------------------------------
# the corpus


@dataclass(frozen=True)
class Case:
    """A hostile input and the answer it must get.

    ``argv`` builds the command line (after ``parity``) once ``setup`` has built the inputs. ``codes``: the
    allowed exit codes. ``says``: a substring of the one stderr line (or of stdout when ``stderr_lines`` is 0).
    ``stdout_json``: stdout must be strict JSON (no NaN/Infinity tokens) and pass this check.
    """

    id: str
    kind: str  # which class of defect (issue 13's numbering, or "new")
    argv: Callable[[Ctx], list[str]]
    setup: Callable[[Ctx], object] | None = None
    codes: tuple[int, ...] = (2,)
    says: str | None = None
    stderr_lines: int = 1
    stdout_json: Callable[[object], bool] | None = None
    stdout_says: str | None = None


def plan(ctx: Ctx) -> list[str]:
    return ["plan", str(ctx.job)]


def plan_json(ctx: Ctx) -> list[str]:
    return ["plan", str(ctx.job), "--json", "-"]


def lint(ctx: Ctx) -> list[str]:
    return ["lint", str(ctx.job), "--base-model", str(TINY)]


def section(key: str, value):
    """Set ``sample.<key>`` to ``value``."""
    return lambda ctx: ctx.edit(lambda p: p["sample"].__setitem__(key, value))


def item(key: str, value):
    """Give sample prompt 0 its own ``<key>: value`` (turning ``prompts:`` into ``samples:``)."""
    def change(process):
        sample = process["sample"]
        items = [{"prompt": p} for p in sample.pop("prompts")]
        items[0][key] = value
        sample["samples"] = items

    return lambda ctx: ctx.edit(change)


def prompt0(suffix: str):
    return lambda ctx: ctx.edit(lambda p: p["sample"]["prompts"].__setitem__(0, p["sample"]["prompts"][0] + suffix))


def replace_config(text: str | bytes):
    def setup(ctx):
        target = ctx.job / "config.yaml"
        target.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def preview_bytes(data: bytes | Callable[[], bytes], name: str = PREVIEW_0):
    return lambda ctx: (ctx.samples / name).write_bytes(data() if callable(data) else data)


def nothing_checked_job(ctx: Ctx) -> None:
    """Every preview is unreplayable (the config lost its prompts): a check replays nothing."""
    ctx.edit(lambda p: (p["sample"].pop("prompts"), p["sample"].__setitem__("samples", [])))


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


CASES: list[Case] = [
    # 1. the command line: every usage error is exit 2, one line with the usage hint
    Case("bogus-option", "1 usage", lambda c: ["plan", str(c.job), "--bogus", "x"], says="No such option: --bogus"),
    Case("lora-without-file", "1 usage", lambda c: ["lora"], says="Missing argument"),
    Case("check-without-job", "1 usage", lambda c: ["check"], says="Missing argument"),
    Case("plan-without-job", "1 usage", lambda c: ["plan"], says="try 'parity plan --help'"),
    Case("lint-without-job", "1 usage", lambda c: ["lint"], says="Missing argument"),
    Case("kernel-search-abc", "1 usage", lambda c: check_argv(c, "--kernel-search", "abc"), says="--kernel-search"),
    Case("kernel-search-0", "1 usage", lambda c: check_argv(c, "--kernel-search", "0"), says="at least 1"),
    Case("unknown-command", "1 usage", lambda c: ["frobnicate"], says="No such command"),
    Case("unknown-root-option", "1 usage", lambda c: ["--bogus"], says="No such option"),
    Case("option-missing-value", "1 usage", lambda c: ["plan", str(c.job), "--assets"], says="requires an argument"),
    Case("extra-argument", "1 usage", lambda c: ["lint", str(c.job), "extra"], says="unexpected extra argument"),
    Case("top-not-a-number", "1 usage", lambda c: ["lora", str(c.job / CHECKPOINT_2), "--top", "many"],
         says="--top"),
    Case("fail-on-sometimes", "1 usage", lambda c: check_argv(c, "--fail-on", "sometimes"), says="--fail-on"),
    Case("pipeline-unknown", "1 usage", lambda c: check_argv(c, "--pipeline", "comfy"), says="--pipeline"),
    Case("lora-not-step-file", "1 usage", lambda c: check_argv(c, "--lora", "abc"), says="STEP=FILE"),
    Case("lora-negative-step", "1 usage", lambda c: check_argv(c, "--lora", f"-2={c.job / CHECKPOINT_2}"),
         says="STEP=FILE"),
    Case("debug-usage-error-still-one-line", "1 usage", lambda c: ["--debug", "plan", "--bogus"],
         says="No such option"),
    Case("bare-parity-prints-help", "1 usage", lambda c: [], stderr_lines=0, stdout_says="Usage: parity"),
    Case("version", "1 usage", lambda c: ["--version"], codes=(0,), stderr_lines=0, stdout_says="parity 0.1.0"),
    Case("help-is-not-an-error", "1 usage", lambda c: ["check", "--help"], codes=(0,), stderr_lines=0,
         stdout_says="--kernel-search"),
    Case("device-unknown", "1 usage", lambda c: check_argv(c, "--device", "tpu"), says="--device"),
    Case("assets-missing", "1 usage", lambda c: ["plan", str(c.job), "--assets", str(c.root / "none")],
         says="assets folder does not exist"),
    Case("plan-json-inside-job", "1 usage", lambda c: ["plan", str(c.job), "--json", str(c.job / "plan.json")],
         says="inside the job folder"),
    Case("check-out-inside-job", "1 usage", lambda c: check_argv(c, out=c.job / "report"),
         says="inside the job folder"),
    Case("job-folder-missing", "1 usage", lambda c: ["plan", str(c.root / "nope")], says="no such job folder"),
    Case("job-folder-is-a-file", "1 usage", lambda c: ["plan", str(c.job / "config.yaml")], says="is a file"),

    # 2. the output folder: one line, exit 2 (the folder) or 3 (the machine)
    Case("out-is-a-file", "2 output", lambda c: check_argv(c, out=c.root / "afile"),
         setup=lambda c: (c.root / "afile").write_text("x"), says="is a file, not a folder"),
    Case("out-under-a-file", "2 output", lambda c: check_argv(c, out=c.root / "afile" / "report"),
         setup=lambda c: (c.root / "afile").write_text("x"), says="is a file, not a folder"),
    Case("out-is-dev-null", "2 output", lambda c: check_argv(c, out=Path("/dev/null")), says="not a folder"),
    Case("out-immutable", "2 output", lambda c: check_argv(c, out=c.root / "locked"),
         setup=lambda c: immutable(c, c.root / "locked"), says="read-only"),
    Case("out-under-immutable", "2 output", lambda c: check_argv(c, out=c.root / "locked" / "a" / "b"),
         setup=lambda c: immutable(c, c.root / "locked"), says="read-only"),
    Case("out-broken-link", "2 output", lambda c: check_argv(c, out=c.root / "dangling"),
         setup=lambda c: (c.root / "dangling").symlink_to(c.root / "nowhere"), says="broken link"),
    Case("out-read-only-mount", "2 output", lambda c: check_argv(c, out=c.root / "ro" / "report"),
         setup=lambda c: tmpfs(c, c.root / "ro", read_only=True), says="read-only"),
    Case("plan-json-disk-full", "2 output", lambda c: ["plan", str(c.job), "--json", str(c.out / "p.json")],
         setup=lambda c: tmpfs(c, c.out, full=True), codes=(3,), says="No space left on device"),
    Case("plan-json-read-only", "2 output", lambda c: ["plan", str(c.job), "--json", str(c.root / "ro" / "p.json")],
         setup=lambda c: tmpfs(c, c.root / "ro", read_only=True), says="read-only"),
    Case("plan-json-is-a-folder", "2 output", lambda c: ["plan", str(c.job), "--json", str(c.root)],
         says="in the way"),
    Case("plan-json-immutable", "2 output", lambda c: ["plan", str(c.job), "--json", str(c.root / "locked" / "p")],
         setup=lambda c: immutable(c, c.root / "locked"), says="cannot write the plan"),
    Case("report-disk-full", "2 output", lambda c: check_argv(c),
         setup=lambda c: (nothing_checked_job(c), tmpfs(c, c.out, full=True)), codes=(3,),
         says="No space left on device"),

    # 4. what crashed a calibration replay is refused where it is read, naming the file and the field
    Case("sample-width-100000", "4 replay input", lambda c: check_argv(c), setup=section("width", 100000),
         says="sample.width must be at most 8192"),
    Case("sample-height-huge", "4 replay input", plan, setup=section("height", 10**12),
         says="sample.height must be at most 8192"),
    Case("item-width-huge", "4 replay input", plan, setup=item("width", 65536), says="samples[0].width"),
    Case("sample-steps-0", "4 replay input", lambda c: check_argv(c), setup=section("sample_steps", 0),
         says="sample.sample_steps must be at least 1"),
    Case("item-steps-0", "4 replay input", plan, setup=item("sample_steps", 0), says="samples[0].sample_steps"),
    Case("flag-steps-0", "4 replay input", plan, setup=prompt0(" --steps 0"), says="num_inference_steps"),
    Case("flag-width-huge", "4 replay input", plan, setup=prompt0(" --w 100000"), says="width must be at most"),
    Case("train-steps-0", "4 replay input", plan, setup=lambda c: c.edit(lambda p: p["train"].__setitem__("steps", 0)),
         says="train.steps must be at least 1"),
    Case("num-frames-0", "4 replay input", plan, setup=section("num_frames", 0), says="num_frames"),
    Case("width-not-a-number", "4 replay input", plan, setup=section("width", "wide"), says="sample.width"),
    Case("seed-beyond-torch", "4 replay input", plan, setup=section("seed", 2**70), says="outside torch's seed range"),
    Case("ctrl-img-etc-passwd", "4 replay input", plan_json, setup=item("ctrl_img", "/etc/passwd"), codes=(0,),
         stderr_lines=0, stdout_json=lambda d: "not an image" in d["items"][0]["reason"]),
    Case("ctrl-img-fifo", "4 replay input", plan_json,
         setup=lambda c: (mkfifo(c.root / "ref.png"), item("ctrl_img", str(c.root / "ref.png"))(c)), codes=(0,),
         stderr_lines=0, stdout_json=lambda d: not d["items"][0]["replayable"]),
    Case("ctrl-img-folder", "4 replay input", plan_json, setup=item("ctrl_img", "/etc"), codes=(0,),
         stderr_lines=0, stdout_json=lambda d: not d["items"][0]["replayable"]),
    Case("ctrl-img-bomb", "4 replay input", plan_json,
         setup=lambda c: ((c.root / "ref.png").write_bytes(png_with_header_size(60000, 60000)),
                          item("ctrl_img", str(c.root / "ref.png"))(c)), codes=(0,), stderr_lines=0,
         stdout_json=lambda d: "too large" in d["items"][0]["reason"]),

    # 5. decompression bombs: refused from the header, before decoding
    Case("preview-png-bomb-check", "5 bomb", lambda c: check_argv(c),
         setup=preview_bytes(lambda: png_with_header_size(60000, 60000)), says="too large to decode"),
    Case("preview-jpeg-bomb-check", "5 bomb", lambda c: check_argv(c),
         setup=preview_bytes(lambda: jpeg_with_header_size(65000, 65000)), says="too large to decode"),
    Case("preview-over-cap-check", "5 bomb", lambda c: check_argv(c),
         setup=preview_bytes(lambda: png_with_header_size(9000, 9000)), says="over parity's cap"),
    Case("preview-wide-over-cap", "5 bomb", lambda c: check_argv(c),
         setup=preview_bytes(lambda: png_with_header_size(70000, 1000)), says="over parity's cap"),
    Case("preview-bomb-lint", "5 bomb", lambda c: [*lint(c), "--json"],
         setup=preview_bytes(lambda: png_with_header_size(60000, 60000)), codes=(0,), stderr_lines=0,
         stdout_json=lambda d: any(f["code"] == "preview_unreadable" and "too large" in f["title"]
                                   for f in d["findings"])),
    Case("preview-bomb-plan", "5 bomb", plan, setup=preview_bytes(lambda: png_with_header_size(60000, 60000)),
         codes=(0,), stderr_lines=0),
    Case("preview-empty-file", "5 bomb", lambda c: check_argv(c), setup=preview_bytes(b""), says="cannot read"),
    Case("preview-text", "5 bomb", lambda c: check_argv(c), setup=preview_bytes(b"hello"), says="cannot read"),

    # 6. LoRA files: NaN/Inf counted per tensor, strict JSON, a non-scalar alpha is one line
    Case("lora-nan-json", "6 lora", lambda c: ["lora", str(nan_lora(c)), "--base-model", str(TINY), "--json"],
         codes=(1,), stderr_lines=0,
         stdout_json=lambda d: d["applies"] is False and sum(d["nonfinite"].values()) == 3),
    Case("lora-vector-alpha", "6 lora", lambda c: ["lora", str(vector_alpha_lora(c)), "--base-model", str(TINY)],
         says="an alpha must be one number"),
    Case("lora-missing", "6 lora", lambda c: ["lora", str(c.root / "none.safetensors")], says="not found"),
    Case("lora-folder", "6 lora", lambda c: ["lora", str(c.job)], says="is a folder"),
    Case("lora-pickle", "6 lora", lambda c: ["lora", str(pickle_lora(c))], says="never loads pickles"),
    Case("lora-pickle-as-override", "6 lora", lambda c: check_argv(c, "--lora", f"2={pickle_lora(c)}"),
         says=".safetensors"),
    Case("lora-fifo", "6 lora", lambda c: ["lora", str(mkfifo(c.root / "x.safetensors"))], says="FIFO"),
    Case("lora-fifo-override", "6 lora", lambda c: check_argv(c, "--lora", f"2={mkfifo(c.root / 'x.safetensors')}"),
         says="FIFO"),
    Case("lora-empty", "6 lora", lambda c: ["lora", str(c.root / "empty.safetensors")],
         setup=lambda c: (c.root / "empty.safetensors").write_bytes(b""), says="not a safetensors file"),
    Case("lora-header-beyond-file", "6 lora", lambda c: ["lora", str(safetensors_with_header(c, b"{}", 2**40))],
         says="beyond the file"),
    Case("lora-header-not-json", "6 lora", lambda c: ["lora", str(safetensors_with_header(c, b"\xff\xfe{"))],
         says="not JSON"),
    Case("lora-metadata-not-text", "6 lora",
         lambda c: ["lora", str(safetensors_with_header(c, b'{"__metadata__": {"a": 1}}'))], says="__metadata__"),
    Case("lora-no-suffix", "6 lora", lambda c: ["lora", str(c.job / "config.yaml")], says="not a .safetensors"),
    Case("lora-unknown-step", "6 lora", lambda c: check_argv(c, "--lora", f"3={c.job / CHECKPOINT_2}"),
         says="no preview at step 3"),
    Case("lora-override-missing", "6 lora", lambda c: check_argv(c, "--lora", f"2={c.root / 'gone.safetensors'}"),
         says="not found"),
    Case("checkpoint-header-beyond-file", "6 lora", plan,
         setup=lambda c: (c.job / CHECKPOINT_2).write_bytes(struct.pack("<Q", 2**50) + b"{}"),
         says="beyond the file"),
    Case("checkpoint-empty", "6 lora", plan, setup=lambda c: (c.job / CHECKPOINT_2).write_bytes(b""),
         says="shorter than its 8-byte header"),

    # 7. non-finite numbers: on the command line a usage error, in the config an input error naming the field
    *[Case(f"threshold-{option.strip('-')}-{value}", "7 non-finite", (lambda o, v: lambda c: check_argv(c, o, v))(option, value),
           says="must be a finite number")
      for option, value in (("--psnr-pass", "nan"), ("--psnr-pass", "inf"), ("--ssim-pass", "nan"),
                            ("--ssim-pass", "-inf"), ("--ssim-drift", "inf"))],
    Case("threshold-not-a-number", "7 non-finite", lambda c: check_argv(c, "--psnr-pass", "lots"), says="--psnr-pass"),
    Case("threshold-out-of-range", "7 non-finite", lambda c: check_argv(c, "--ssim-pass", "1.5"), says="within [0, 1]"),
    Case("guidance-nan", "7 non-finite", plan, setup=section("guidance_scale", float("nan")),
         says="sample.guidance_scale must be a finite number"),
    Case("multiplier-inf", "7 non-finite", plan, setup=section("network_multiplier", float("-inf")),
         says="network_multiplier"),
    Case("multiplier-text-nan", "7 non-finite", plan, setup=section("network_multiplier", "nan"),
         says="network_multiplier must be a finite number"),
    Case("guidance-rescale-nan", "7 non-finite", plan, setup=section("guidance_rescale", float("nan")),
         says="guidance_rescale"),
    Case("linear-alpha-nan", "7 non-finite", plan,
         setup=lambda c: c.edit(lambda p: p["network"].__setitem__("linear_alpha", float("nan"))), says="linear_alpha"),
    Case("flag-cfg-nan", "7 non-finite", plan, setup=prompt0(" --cfg nan"), says="guidance_scale must be a finite"),
    Case("flag-multiplier-inf", "7 non-finite", plan, setup=prompt0(" --m inf"), says="network_multiplier"),
    Case("yaml-nan-literal", "7 non-finite", plan_json, setup=lambda c: (c.job / "config.yaml").write_text(
        (c.job / "config.yaml").read_text().replace("guidance_scale: 4", "guidance_scale: .nan")),
        says="finite number"),

    # 8. a check that replays nothing is a clear non-zero exit; an unused --lora is an error
    Case("samples-empty", "8 nothing checked", lambda c: check_argv(c), setup=nothing_checked_job, codes=(5,),
         says="nothing was checked"),
    Case("only-random-seeds", "8 nothing checked", lambda c: check_argv(c),
         # no training_seed: drawn seeds cannot be recovered (with one, parity check searches for them)
         setup=lambda c: c.edit(lambda p: (p["sample"].__setitem__("seed", -1), p["sample"].__setitem__("walk_seed", False),
                                           p["sample"]["prompts"].__setitem__(1, "a blue square"),
                                           p.pop("training_seed", None))),
         codes=(5,), says="seed -1"),
    Case("lora-step-without-previews", "8 nothing checked", lambda c: check_argv(c, "--lora", f"5={c.job / CHECKPOINT_2}"),
         says="no preview at step 5"),

    # 9. alias bombs and things that would block
    Case("yaml-billion-laughs", "9 bomb/fifo", plan_json,
         setup=lambda c: (c.job / "config.yaml").write_text((c.job / "config.yaml").read_text() + alias_bomb()),
         says="alias bomb"),
    Case("yaml-billion-laughs-lint", "9 bomb/fifo", lint,
         setup=lambda c: (c.job / "config.yaml").write_text((c.job / "config.yaml").read_text() + alias_bomb()),
         says="alias bomb"),
    Case("yaml-prompts-alias-bomb", "9 bomb/fifo", plan,
         setup=lambda c: (c.job / "config.yaml").write_text(
             alias_bomb(6, 10) + (c.job / "config.yaml").read_text().replace(
                 "      prompts:\n", "      prompts: *lol5\n      unused:\n")),
         says="alias bomb"),
    Case("yaml-recursive-alias", "9 bomb/fifo", plan,
         setup=lambda c: (c.job / "config.yaml").write_text((c.job / "config.yaml").read_text() + "loop: &loop [*loop]\n"),
         says="recursive alias"),
    Case("yaml-deep-nesting", "9 bomb/fifo", plan, setup=replace_config("[" * 20000 + "]" * 20000), says="nested too deeply"),
    Case("yaml-huge-file", "9 bomb/fifo", plan, setup=replace_config("# " + "x" * (9 * 2**20) + "\n"), says="larger than"),
    Case("yaml-merge-keys-are-fine", "9 bomb/fifo", plan,
         setup=lambda c: (c.job / "config.yaml").write_text("defaults: &d {seed: 1}\nuse: {<<: *d}\n"
                                                           + (c.job / "config.yaml").read_text()),
         codes=(0,), stderr_lines=0),
    Case("json-deep-nesting", "9 bomb/fifo", plan,
         setup=lambda c: ((c.job / "config.yaml").unlink(), (c.job / ".job_config.json").write_text("[" * 100000 + "]" * 100000)),
         says="nested too deeply"),
    Case("config-yaml-fifo", "9 bomb/fifo", plan, setup=lambda c: ((c.job / "config.yaml").unlink(), mkfifo(c.job / "config.yaml")),
         says="FIFO"),
    Case("job-config-json-fifo", "9 bomb/fifo", plan,
         setup=lambda c: ((c.job / "config.yaml").unlink(), mkfifo(c.job / ".job_config.json")), says="FIFO"),
    Case("config-yaml-is-a-folder", "9 bomb/fifo", plan,
         setup=lambda c: ((c.job / "config.yaml").unlink(), (c.job / "config.yaml").mkdir()), says="folder"),
    Case("preview-fifo-lint", "9 bomb/fifo", lint,
         setup=lambda c: mkfifo(c.samples / "1795681299999__000000006_3.jpg"), says="FIFO"),
    Case("preview-fifo-plan", "9 bomb/fifo", plan,
         setup=lambda c: mkfifo(c.samples / "1795681299999__000000006_3.jpg"), says="must be a regular file"),
    Case("preview-fifo-check", "9 bomb/fifo", lambda c: check_argv(c),
         setup=lambda c: mkfifo(c.samples / "1795681299999__000000006_3.jpg"), says="FIFO"),
    Case("image-named-fifo", "9 bomb/fifo", plan, setup=lambda c: mkfifo(c.samples / "extra.png"), says="FIFO"),
    Case("fifo-with-other-name-is-ignored", "9 bomb/fifo", plan, setup=lambda c: mkfifo(c.samples / "notes"),
         codes=(0,), stderr_lines=1, says="ignored samples/notes"),
    Case("preview-is-dev-zero-link", "9 bomb/fifo", plan,
         setup=lambda c: (c.samples / "1795681299999__000000006_3.jpg").symlink_to("/dev/zero"), says="character device"),
    Case("preview-dangling-link", "9 bomb/fifo", plan,
         setup=lambda c: (c.samples / "1795681299999__000000006_3.jpg").symlink_to(c.root / "gone.jpg"),
         says="broken link"),
    Case("preview-socket", "9 bomb/fifo", plan,
         setup=lambda c: bind_socket(c.samples / "1795681299999__000000006_3.jpg", c), says="socket"),
    Case("checkpoint-fifo-is-not-read", "9 bomb/fifo", plan_json,
         setup=lambda c: ((c.job / CHECKPOINT_2).unlink(), mkfifo(c.job / CHECKPOINT_2)), codes=(0,), stderr_lines=0,
         stdout_json=lambda d: sum(not i["replayable"] for i in d["items"]) == 3),

    # 10. two config files that disagree: a warning, not silence
    Case("configs-disagree", "10 configs", plan,
         setup=lambda c: (c.job / ".job_config.json").write_text(json.dumps(
             {**c.config(), "config": {**c.config()["config"], "name": "renamed"}})),
         codes=(0,), stderr_lines=1, says="disagree (first at config.name)"),
    Case("configs-agree", "10 configs", plan,
         setup=lambda c: (c.job / ".job_config.json").write_text(json.dumps(c.config())), codes=(0,), stderr_lines=0),
    Case("job-config-json-broken", "10 configs", plan,
         setup=lambda c: (c.job / ".job_config.json").write_text("{"), codes=(0,), stderr_lines=1,
         says="cannot be compared"),

    # new: more broken configs and names
    Case("config-empty", "new config", plan, setup=replace_config(""), says="expected a mapping"),
    Case("config-a-list", "new config", plan, setup=replace_config("- 1\n- 2\n"), says="expected a mapping"),
    Case("config-binary", "new config", plan, setup=replace_config(b"\x00\xff\xfe\x80garbage"), says="UTF-8"),
    Case("config-no-process", "new config", plan, setup=lambda c: c.edit(lambda p: p.clear()) or None,
         says="LoRA training process"),
    Case("config-python-tag", "new config", plan,
         setup=lambda c: (c.job / "config.yaml").write_text(
             f"x: !!python/object/apply:os.system ['touch {c.root / 'PWNED'}']\n" + (c.job / "config.yaml").read_text()),
         says="not valid YAML"),
    Case("prompts-not-a-list", "new config", plan, setup=section("prompts", "a cat"), says="prompts must be a list"),
    Case("trigger-word-a-list", "new config", plan,
         setup=lambda c: c.edit(lambda p: p.__setitem__("trigger_word", ["a"])), says="trigger_word must be text"),
    Case("samples-is-a-file", "new config", plan,
         setup=lambda c: (shutil.rmtree(c.samples), c.samples.write_text("x")), says="no samples folder"),
    Case("job-folder-symlink-loop", "new config", lambda c: ["plan", str(c.root / "loop")],
         setup=lambda c: (c.root / "loop").symlink_to(c.root / "loop"), says="no such job folder"),
    Case("newline-in-file-name", "new config", plan, setup=lambda c: (c.samples / "evil\nname.jpg").write_bytes(b"x"),
         says="not a preview"),
    Case("shell-in-prompt-not-run", "new config", plan, setup=prompt0(" $(touch PWNED) `touch PWNED`"),
         codes=(0,), stderr_lines=0),
    Case("shell-in-file-name-not-run", "new config", plan,
         setup=lambda c: (c.samples / ";touch PWNED;").write_text("x"), codes=(0,), stderr_lines=1,
         says="not a preview"),
    Case("checkpoint-metadata-code-not-run", "new config", plan_json,
         setup=lambda c: (c.job / CHECKPOINT_2).write_bytes(
             (lambda h: struct.pack("<Q", len(h)) + h)(json.dumps(
                 {"__metadata__": {"training_info": "__import__('os').system('touch PWNED')"}}).encode())),
         codes=(0,), stderr_lines=0),
]


def run_case(case: Case, root: Path) -> dict:
    """Build ``case`` in ``root``, run it and return what the assertions need."""
    ctx = Ctx(root)
    ctx.prepare()
    try:
        try:
            if case.setup is not None:
                case.setup(ctx)
            argv = case.argv(ctx)
        except Unavailable as exc:
            return {"skip": str(exc)}
        before = tree_state(root, skip=ctx.out)
        try:
            result = subprocess.run([sys.executable, "-m", "parity", *argv], capture_output=True, text=True,
                                    env=ctx.env(), cwd=root, timeout=CASE_TIMEOUT_S, stdin=subprocess.DEVNULL)
            code, out, err = result.returncode, result.stdout, result.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = "timeout", str(exc.stdout), str(exc.stderr)
        after = tree_state(root, skip=ctx.out)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        return {"argv": argv, "code": code, "stdout": out, "stderr": err, "changed": changed}
    finally:
        for cleanup in reversed(ctx.cleanups):
            cleanup()
