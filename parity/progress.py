"""Progress of ``parity check`` on stderr: a live bar on a terminal, plain lines in a log (CI, a pipe, a file).

``run_check`` reports through one callable, ``progress(label)``: a preview's file name starts that preview's replay;
any other label starts a phase ("choosing the noise algorithm", "diagnosing X.jpg"). Both reporters here take that
call. A bar redrawn in place is unreadable in a log, and rich draws nothing at all without a terminal, so a log
gets one line per replay, with the count and an ETA, and one per phase; a phase that runs on without a new line
(loading a model, a diagnosis) repeats its line every ``heartbeat`` seconds, so a log never stalls silently.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

PREVIEW_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FIRST_PHASE = "loading the base model"


def is_preview(label: str) -> bool:
    """Whether a progress label names a preview (its replay starts) rather than a phase. A phase can end in a file
    name too ("diagnosing X.jpg"), but it is words: ai-toolkit's preview names hold no space."""
    return " " not in label and label.lower().endswith(PREVIEW_SUFFIXES)


def clock_text(seconds: float) -> str:
    """0:07, 3:25, 1:02:09."""
    whole = int(max(seconds, 0) + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLines:
    """Plain progress lines for a log: ``[elapsed] what``, flushed one at a time.

    ``total`` is the number of replays the run will start (None: unknown, then no ETA). Replay k of n prints
    ``[0:41] replay 3/12 NAME (about 1:40 left)``: the time left is the mean time per replay so far (from the first
    replay's start to this one's) times the replays left, counting this one; a heartbeat counts it down. Nothing is
    printed before the first event or heartbeat, so a run that fails at once prints only its error line. Use as a
    context manager: the heartbeat thread runs inside it.
    """

    def __init__(self, total: int | None = None, stream: TextIO | None = None, heartbeat: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.stream = stream
        self.heartbeat = heartbeat
        self.clock = clock
        self.started = clock()
        self.phase = FIRST_PHASE
        self.phase_started = self.started
        self.done = 0  # replays started so far
        self.first_replay: float | None = None
        self.estimate: tuple[float, float] | None = None  # (when, seconds left then), from the last replay's start
        self.last_line = self.started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, label: str) -> None:
        if is_preview(label):
            self.advance(label)
        else:
            self.start_phase(label)

    def start_phase(self, label: str) -> None:
        """A new phase (no count): one line now."""
        with self._lock:
            self.phase, self.phase_started = label, self.clock()
            self._write(label)

    def advance(self, preview: str) -> None:
        """The next replay starts: one line with its number and, from the second on, the time left."""
        with self._lock:
            now = self.clock()
            if self.first_replay is None:
                self.first_replay = now
            self.done += 1
            self.phase, self.phase_started = f"replaying {preview}", now
            if self.total and self.done >= 2:
                per_replay = (now - self.first_replay) / (self.done - 1)
                self.estimate = (now, per_replay * max(self.total - self.done + 1, 0))
            eta = self._eta(now)
            self._write(f"replay {self._count()} {preview}" + (f" ({eta})" if eta else ""))

    def beat(self) -> None:
        """Repeat the current phase when nothing was printed for ``heartbeat`` seconds (the thread calls it)."""
        with self._lock:
            now = self.clock()
            if now - self.last_line < self.heartbeat:
                return
            eta = self._eta(now)
            count = f" ({self._count()} started" + (f", {eta})" if eta else ")") if self.done else ""
            self._write(f"still {self.phase}: {clock_text(now - self.phase_started)} so far{count}")

    def _count(self) -> str:
        return f"{self.done}/{self.total}" if self.total else str(self.done)

    def _eta(self, now: float) -> str:
        if self.estimate is None or not self.phase.startswith("replaying "):
            return ""
        since, left = self.estimate
        return f"about {clock_text(left - (now - since))} left" if left - (now - since) >= 0.5 else ""

    def _write(self, text: str) -> None:
        now = self.clock()
        self.last_line = now
        stream = self.stream or sys.stderr
        stream.write(f"[{clock_text(now - self.started)}] {text}\n")
        stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(min(self.heartbeat, 1.0)):
            self.beat()

    def __enter__(self) -> ProgressLines:
        self._thread = threading.Thread(target=self._run, name="parity-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class ProgressBar:
    """The live bar on a terminal: phase or preview, count, elapsed and time left (rich), gone when done."""

    def __init__(self, total: int | None, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        self.task = self.bar.add_task(FIRST_PHASE, total=total)

    def __call__(self, label: str) -> None:
        if is_preview(label):
            self.bar.update(self.task, advance=1, description=f"replaying {label}")
        else:
            self.bar.update(self.task, description=label)

    def __enter__(self) -> ProgressBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


def progress_for(console, total: int | None) -> ProgressBar | ProgressLines:
    """The bar when ``console`` (stderr) is a terminal, plain lines otherwise."""
    return ProgressBar(total, console) if console.is_terminal else ProgressLines(total, stream=console.file)
