"""Progress of ``parity check`` on stderr: a live bar on a terminal, plain lines in a log (CI, a pipe, a file).

``run_check`` reports through one callable, ``progress(label)``: a preview's file name starts that preview's replay;
a :class:`Tick` starts the next item of a counted phase ("diagnosing 3/8 X.jpg"); any other label starts a phase
("choosing the noise algorithm"). Both reporters here take that call, and show the time left of every counted
phase. A bar redrawn in place is unreadable in a log, and rich draws nothing at all without a terminal, so a log
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


class Tick(str):
    """Item ``done`` of ``total`` of a counted phase starts ("diagnosing 3/8 NAME"): the reporters show the count
    and the time left (the mean time per item so far times the items left). A ``str``, so that a plain
    ``progress(label)`` consumer reads it as the phase line it is."""

    def __new__(cls, phase: str, done: int, total: int, name: str = ""):
        tick = super().__new__(cls, f"{phase} {done}/{total}" + (f" {name}" if name else ""))
        tick.phase, tick.done, tick.total, tick.name = phase, done, total, name
        return tick


class PhaseTimer:
    """The time left in a counted phase, from the start of its first item to the start of the current one."""

    def __init__(self):
        self.phase: str | None = None
        self.first = 0.0

    def left(self, tick: Tick, now: float) -> float | None:
        """Seconds left when ``tick`` starts at ``now``, counting its own item; None before a second item."""
        if tick.phase != self.phase or tick.done <= 1:
            self.phase, self.first = tick.phase, now
            return None
        per_item = (now - self.first) / (tick.done - 1)
        return per_item * max(tick.total - tick.done + 1, 0)


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
        self.counted = False  # the current phase counts items (replays, a Tick's phase): it has a time left
        self.timer = PhaseTimer()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, label: str) -> None:
        if isinstance(label, Tick):
            self.tick(label)
        elif is_preview(label):
            self.advance(label)
        else:
            self.start_phase(label)

    def start_phase(self, label: str) -> None:
        """A new phase (no count): one line now."""
        with self._lock:
            self.phase, self.phase_started = label, self.clock()
            self.estimate, self.counted = None, False
            self._write(label)

    def tick(self, tick: Tick) -> None:
        """The next item of a counted phase (diagnosis, say): one line with its count and, from the second on,
        the time left."""
        with self._lock:
            now = self.clock()
            left = self.timer.left(tick, now)
            self.phase, self.phase_started, self.counted = str(tick), now, True
            self.estimate = (now, left) if left is not None else None
            eta = self._eta(now)
            self._write(str(tick) + (f" ({eta})" if eta else ""))

    def advance(self, preview: str) -> None:
        """The next replay starts: one line with its number and, from the second on, the time left."""
        with self._lock:
            now = self.clock()
            if self.first_replay is None:
                self.first_replay = now
            self.done += 1
            self.phase, self.phase_started, self.counted = f"replaying {preview}", now, True
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
            if self.phase.startswith("replaying ") and self.done:
                more = f" ({self._count()} started" + (f", {eta})" if eta else ")")
            else:
                more = f" ({eta})" if eta else ""
            self._write(f"still {self.phase}: {clock_text(now - self.phase_started)} so far{more}")

    def _count(self) -> str:
        return f"{self.done}/{self.total}" if self.total else str(self.done)

    def _eta(self, now: float) -> str:
        if self.estimate is None or not self.counted:
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
        self.timer = PhaseTimer()

    def __call__(self, label: str) -> None:
        if isinstance(label, Tick):
            left = self.timer.left(label, time.monotonic())
            eta = f" (about {clock_text(left)} left)" if left is not None and left >= 0.5 else ""
            self.bar.update(self.task, description=f"{label}{eta}")
        elif is_preview(label):
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
