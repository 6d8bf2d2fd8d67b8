"""Recover the seeds ai-toolkit drew for ``seed: -1`` previews, by replay (torch-free).

For a seed of -1 (before the prompt's flags are read) ai-toolkit's ``GenerateImageConfig`` calls
``random.randint(0, 2**32 - 1)`` and records nothing. ``BaseTrainProcess`` seeds Python's ``random`` with the
process's ``training_seed`` when it is built, so every drawn seed is a value of a known Mersenne Twister stream
at an unknown offset: setup, the dataset and the training steps read words of it between the draws.

The stream, in 32-bit words: ``randint(0, 2**32 - 1)`` is ``getrandbits(33)`` drawn until it is below 2**32, and
``getrandbits(33)`` takes one word (the low 32 bits) and the top bit of the next (bit 32). A draw starting at
word offset k therefore returns word k when the top bit of word k+1 is clear, else starts again at k+2 (about
half the draws are redrawn at least once). Offsets k, k+2, ... of such a chain give the same value and end at the
same word, so a candidate is kept once, at its smallest offset, with the words it read from there.

The search is a pure function over a ``probe(item, seed)`` callable that replays the preview with that seed and
scores it (the family's session and the scores are behind it, as in ``parity.calibrate``): candidates in offset
order, from the first word the draw can have used, at most ``search`` words on. A candidate is accepted only on
clear evidence (see :func:`judge`); otherwise the preview is "not recovered", never given a seed it may not have.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from parity.calibrate import CLEARLY_UNRELATED_SSIM

# Default --seed-search: words searched from the first one a draw can have used. Genuine jobs drew every seed
# within 29 words of where the search starts (h_randseed at 6 and 12: offset 12 is exactly where the step-0 draw
# ended); 64 covers twice that for at most ~48 distinct candidates (a rejection chain repeats a value).
SEARCH_WORDS = 64
# A PASS-level candidate (not identical: a float16 checkpoint, a drifted base) is accepted only against this many
# other candidates (the window's all, if fewer) that each made an unrelated picture: that contrast shows that
# the seed, not the prompt or an overtrained LoRA, makes the picture. A wrong seed is a wrong noise draw: SSIM
# ~0.03-0.13 on the oracle (PASS: 0.984), so the line between them is calibrate's CLEARLY_UNRELATED_SSIM (0.5).
CONTRAST_CANDIDATES = 3
UNRELATED_SSIM = CLEARLY_UNRELATED_SSIM
WORDS_PER_ATTEMPT = 2  # getrandbits(33) reads two 32-bit words: every draw reads at least this many

RECOVERED, NOT_RECOVERED, NOT_REPLAYABLE = "recovered", "not recovered", "not replayable"


@dataclass(frozen=True)
class Candidate:
    """``randint(0, 2**32 - 1)`` started at word ``offset`` of the stream: its value and the words it read."""

    seed: int
    offset: int
    words: int

    @property
    def end(self) -> int:
        """The word the next call of ``random`` reads first."""
        return self.offset + self.words


class WordStream:
    """The 32-bit words ``random.seed(training_seed)`` gives, read as far as asked (CPython's Mersenne Twister)."""

    def __init__(self, training_seed: int):
        self._random = random.Random(training_seed)
        self._words: list[int] = []

    def word(self, index: int) -> int:
        while len(self._words) <= index:
            self._words.append(self._random.getrandbits(32))
        return self._words[index]

    def randint_at(self, offset: int) -> Candidate:
        """What ``randint(0, 2**32 - 1)`` returns when ``offset`` words were read before it."""
        start = offset
        while self.word(start + 1) >> 31:  # bit 32 set: the value is >= 2**32, drawn again
            start += WORDS_PER_ATTEMPT
        return Candidate(self.word(start), offset, start + WORDS_PER_ATTEMPT - offset)

    def candidates(self, start: int, words: int) -> list[Candidate]:
        """The distinct values of draws starting at offsets ``start`` .. ``start + words - 1``, each at its
        smallest offset."""
        found: dict[int, Candidate] = {}
        for offset in range(start, start + words):
            candidate = self.randint_at(offset)
            found.setdefault(candidate.seed, candidate)
        return list(found.values())


@dataclass(frozen=True)
class Trial:
    """One candidate replayed against the preview."""

    seed: int
    offset: int
    ssim: float
    verdict: str  # EXACT, PASS, DRIFT or FAIL
    replayed: bool  # False: its pixels came from the replay cache

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "offset": self.offset, "ssim": self.ssim, "verdict": self.verdict,
                "replayed": self.replayed}


@dataclass(frozen=True)
class SeedRecovery:
    """What recovery found for one drawn-seed preview, and how."""

    preview: str  # the file name in samples/
    training_seed: int
    status: str  # RECOVERED, NOT_RECOVERED or NOT_REPLAYABLE (its draw only counted)
    summary: str  # in words: how it was confirmed, or what was tried
    seed: int | None = None
    offset: int | None = None  # the smallest word offset giving this seed
    words: int | None = None  # words the draw read from there
    confirmed_by: str | None = None  # "EXACT" or "PASS"
    window: tuple[int, int] | None = None  # word offsets searched: [start, end)
    trials: tuple[Trial, ...] = field(default=())

    @property
    def recovered(self) -> bool:
        return self.status == RECOVERED

    @property
    def end(self) -> int:
        return self.offset + self.words

    @property
    def replays(self) -> int:
        return sum(t.replayed for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        return {"preview": self.preview, "training_seed": self.training_seed, "status": self.status,
                "summary": self.summary, "seed": self.seed, "offset": self.offset, "words": self.words,
                "confirmed_by": self.confirmed_by, "window": list(self.window) if self.window else None,
                "candidates_tried": len(self.trials), "replays": self.replays,
                "trials": [t.to_dict() for t in self.trials]}


@dataclass(frozen=True)
class DrawRound:
    """One sampling round's seed draws, in the order ai-toolkit made them (prompt order, before any image)."""

    label: str
    draws: int  # randint calls the round made
    previews: dict[int, Any]  # draw index -> the plan item whose seed that draw was (drawn, preview present)


def draw_rounds(items) -> list[DrawRound]:
    """The plan's rounds that drew seeds, in the order they ran (by save time), each with its drawn previews."""
    rounds: dict[tuple[int, str], list] = {}
    for item in items:
        if item.round_draws:
            rounds.setdefault((item.step, item.round), []).append(item)
    ordered = sorted(rounds.items(), key=lambda pair: min(i.ms_time for i in pair[1]))
    return [DrawRound(f"step {step}" + (" (first_sample)" if kind == "first_sample" else ""),
                      members[0].round_draws,
                      {i.seed_draw: i for i in members if i.seed_source == "drawn" and i.seed_draw is not None})
            for (step, kind), members in ordered]


Probe = Callable[[Any, int], tuple[float, str, bool]]  # (item, seed) -> (SSIM, verdict, replayed)


def recover_seeds(rounds: list[DrawRound], training_seed: int, search: int, probe: Probe,
                  part: tuple[int, int] = (0, 1), gather: Callable | None = None) -> list[SeedRecovery]:
    """Recover every drawn seed of ``rounds``, in the order ai-toolkit drew them.

    The first draw can start at word 0; each draw reads at least two words, a recovered one exactly its own. Within
    a round the draws follow each other directly, so after a recovered draw the next one of the round starts
    exactly where it ended (an unreplayable one still advances the offset by what the stream says it read);
    between rounds training reads an unknown number of words, so the next round searches forward from there.
    A preview that cannot be replayed (its round's checkpoint is gone) is not searched, but its draw is counted.
    """
    stream = WordStream(training_seed)
    start, exact, found = 0, False, []
    for rnd in rounds:
        exact = False
        for draw in range(rnd.draws):
            item = rnd.previews.get(draw)
            recovery = None
            if item is not None and item.recoverable:
                recovery = search_draw(stream, item, training_seed, start, search, probe, part, gather)
            elif item is not None:  # e.g. its round's checkpoint is gone: not searched, its draw still counted
                recovery = SeedRecovery(item.file, training_seed, NOT_REPLAYABLE, item.reason)
            if recovery is not None:
                found.append(recovery)
            if recovery is not None and recovery.recovered:
                start, exact = recovery.end, True
            elif exact:  # made right where the last one ended: it read what the stream says
                start = stream.randint_at(start).end
            else:
                start += WORDS_PER_ATTEMPT
    return found


def search_draw(stream: WordStream, item, training_seed: int, start: int, search: int, probe: Probe,
                part: tuple[int, int] = (0, 1), gather: Callable | None = None) -> SeedRecovery:
    """Replay the candidates of words ``start`` .. ``start + search - 1`` in offset order until :func:`judge`
    decides. With several ranks each replays one candidate of every batch of ``world`` and the scores are
    gathered, so every rank decides the same."""
    rank, world = part
    candidates = stream.candidates(start, search)
    trials: dict[int, Trial] = {}
    decision = None
    for first in range(0, len(candidates), world):
        batch = candidates[first : first + world]
        mine = {}
        if rank < len(batch):
            candidate = batch[rank]
            ssim, verdict, replayed = probe(item, candidate.seed)
            mine[candidate.seed] = Trial(candidate.seed, candidate.offset, round(float(ssim), 5), verdict, replayed)
        trials.update(gather(mine) if gather is not None else mine)
        decision = judge(candidates, trials)
        if decision is not None:
            break
    tried = tuple(trials[c.seed] for c in candidates if c.seed in trials)
    return verdict_of(item.file, training_seed, (start, start + search), candidates, tried, decision)


def judge(candidates: list[Candidate], trials: dict[int, Trial]) -> str | None:
    """Whether the candidates tried so far decide: "EXACT" (a replay identical to the preview: no other seed gives
    the same pixels), "PASS" (one candidate at the PASS level while every other tried, at least
    ``CONTRAST_CANDIDATES`` of them, made an unrelated picture), "ambiguous" (two at the PASS level: the seed does
    not decide this picture), "unclear" (another scored SSIM >= ``UNRELATED_SSIM``); None: try the next."""
    tried = [trials[c.seed] for c in candidates if c.seed in trials]
    if any(t.verdict == "EXACT" for t in tried):
        return "EXACT"
    passing = [t for t in tried if t.verdict == "PASS"]
    if len(passing) > 1:
        return "ambiguous"
    if not passing:
        return None
    others = [t for t in tried if t is not passing[0]]
    if any(t.ssim >= UNRELATED_SSIM for t in others):
        return "unclear"
    if others and len(others) >= min(CONTRAST_CANDIDATES, len(candidates) - 1):
        return "PASS"
    return None


def verdict_of(preview: str, training_seed: int, window: tuple[int, int], candidates: list[Candidate],
               tried: tuple[Trial, ...], decision: str | None) -> SeedRecovery:
    """The recovery record, with its summary in words."""
    words = f"word offsets {window[0]}-{window[1] - 1}"
    spent = f"{len(tried)} of {len(candidates)} candidates at {words} replayed"
    if decision in ("EXACT", "PASS"):
        best = next(t for t in tried if t.verdict == decision)
        chosen = next(c for c in candidates if c.seed == best.seed)
        if decision == "EXACT":
            how = "confirmed EXACT: its replay is identical to the preview"
        else:
            worst = max(t.ssim for t in tried if t is not best)
            how = (f"confirmed at PASS level: SSIM {best.ssim:.4f} while the {len(tried) - 1} other candidate(s) "
                   f"tried made unrelated pictures (SSIM <= {worst:.3f}, below {UNRELATED_SSIM:g})")
        summary = (f"seed {best.seed}, drawn at word offset {chosen.offset} of training_seed {training_seed}'s "
                   f"stream, {how} ({spent})")
        return SeedRecovery(preview, training_seed, RECOVERED, summary, best.seed, chosen.offset, chosen.words,
                            decision, window, tried)
    ranked = sorted(tried, key=lambda t: -t.ssim)
    best = (f"; best: seed {ranked[0].seed} at offset {ranked[0].offset}, {ranked[0].verdict}, SSIM "
            f"{ranked[0].ssim:.4f}") if ranked else ""
    why = {
        "ambiguous": "several candidates reproduce the preview at PASS level: the seed does not decide this picture",
        "unclear": f"the PASS-level candidate is not far above the others (another scored SSIM >= {UNRELATED_SSIM:g})",
    }.get(decision, "no candidate reproduced the preview clearly (EXACT, or PASS far above every other): a larger "
                    "--seed-search may reach it, or the seed was drawn from another stream (training_seed changed)")
    return SeedRecovery(preview, training_seed, NOT_RECOVERED, f"not recovered: {why} ({spent}{best})",
                        window=window, trials=tried)
