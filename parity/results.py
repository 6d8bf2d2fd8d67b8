"""A finished check run: what the reports render (HTML, JSON, JUnit). Knows nothing about torch.

Every class reads back from the plain dict its ``to_dict`` writes, so a report can be rebuilt from
``parity.json`` and tests can build one without running a model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from parity.scores import SSIM_CONVENTION, Score, Thresholds, Verdict

FAIL_ON = ("fail", "drift")

EXIT_CODES: dict[int, str] = {
    0: "pass: no preview failed (DRIFT counts as a failure only with --fail-on drift)",
    1: "parity failure: a FAIL (or, with --fail-on drift, a DRIFT), a replay that crashed, or a setting proven by "
       "experiment to differ from what made a preview",
    2: "usage or input error: bad arguments, unreadable job folder, config, preview or LoRA, unusable --out",
    3: "environment error: CUDA asked for but absent, base model not found, disk full",
    4: "internal error: a bug in parity (one line; the traceback with --debug)",
    5: "nothing checked: no preview was replayed or scored (none replayable, none matched)",
    130: "interrupted (Ctrl-C): re-run the same command to resume; finished replays are kept",
}
NOTHING_CHECKED = 5
# What the outcome counts decide; the other codes end a run before a report exists.
REPORT_EXIT_CODES = (0, 1, NOTHING_CHECKED)

SEVERITIES = ("info", "warning", "error")


class Outcome(enum.StrEnum):
    """A preview's result in the report: a verdict, or why there is none."""

    EXACT = "EXACT"
    PASS = "PASS"
    DRIFT = "DRIFT"
    FAIL = "FAIL"
    SKIPPED = "SKIPPED"  # not replayable (deleted checkpoint, random seed, ...)
    ERROR = "ERROR"  # the replay was attempted and crashed

    @property
    def rank(self) -> int:
        """Worst first when sorting: ERROR, FAIL, DRIFT, SKIPPED, PASS, EXACT."""
        return _RANK[self]


_RANK = {
    Outcome.ERROR: 0,
    Outcome.FAIL: 1,
    Outcome.DRIFT: 2,
    Outcome.SKIPPED: 3,
    Outcome.PASS: 4,
    Outcome.EXACT: 5,
}


@dataclass(frozen=True)
class Cause:
    """A reason a replay can differ from its preview, with what to do about it."""

    code: str  # stable identifier, e.g. "lora_saved_fp16"
    severity: str  # "info", "warning" or "error"
    title: str  # one line
    explanation: str
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict)  # the facts the cause was read from

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"cause severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "title": self.title,
            "explanation": self.explanation,
            "fix": self.fix,
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cause:
        return cls(
            code=data["code"],
            severity=data.get("severity", "warning"),
            title=data["title"],
            explanation=data.get("explanation", ""),
            fix=data.get("fix", ""),
            evidence=dict(data.get("evidence") or {}),
        )


@dataclass(frozen=True)
class CauseSummary:
    """One cause across the run: how many previews it concerns."""

    code: str
    severity: str
    title: str
    fix: str
    previews: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.previews)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "title": self.title,
            "fix": self.fix,
            "count": self.count,
            "previews": list(self.previews),
        }


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value not in (None, "") else None


@dataclass
class PreviewResult:
    """One preview: the settings it was replayed with, its score and the causes found for it.

    ``settings`` holds the plan's effective values (prompt, negative_prompt, seed, width, height, gen_width,
    gen_height, num_inference_steps, guidance_scale, network_multiplier, checkpoint, lora_merged, ...).
    """

    preview_file: str  # the file name in samples/
    step: int
    prompt_index: int
    settings: dict[str, Any] = field(default_factory=dict)
    replayable: bool = True
    reason: str = ""  # why it cannot be replayed
    score: Score | None = None
    causes: list[Cause] = field(default_factory=list)
    preview_path: Path | None = None
    replay_png: Path | None = None
    error: str | None = None  # the replay crashed with this message
    seconds: float | None = None  # wall time this preview's replay and scoring took (None: not measured)
    # The card images (reports.html.save_card_images), made as the replay finished; not part of parity.json.
    card_file: Path | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.preview_path = _path(self.preview_path)
        self.replay_png = _path(self.replay_png)

    @property
    def outcome(self) -> Outcome:
        if self.error is not None:
            return Outcome.ERROR
        if not self.replayable or self.score is None:
            return Outcome.SKIPPED
        return Outcome(self.score.verdict.value)

    @property
    def verdict(self) -> Verdict | None:
        return self.score.verdict if self.score is not None else None

    @property
    def prompt(self) -> str:
        return str(self.settings.get("prompt") or "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "preview_file": self.preview_file,
            "step": self.step,
            "prompt_index": self.prompt_index,
            "outcome": self.outcome.value,
            "settings": dict(self.settings),
            "replayable": self.replayable,
            "reason": self.reason,
            "error": self.error,
            "seconds": self.seconds,
            "score": self.score.to_dict() if self.score is not None else None,
            "causes": [c.to_dict() for c in self.causes],
            "preview_path": str(self.preview_path) if self.preview_path else None,
            "replay_png": str(self.replay_png) if self.replay_png else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreviewResult:
        score = data.get("score")
        return cls(
            preview_file=data["preview_file"],
            step=int(data["step"]),
            prompt_index=int(data["prompt_index"]),
            settings=dict(data.get("settings") or {}),
            replayable=bool(data.get("replayable", True)),
            reason=data.get("reason") or "",
            score=score if isinstance(score, Score) or score is None else Score.from_dict(score),
            causes=[c if isinstance(c, Cause) else Cause.from_dict(c) for c in data.get("causes") or []],
            preview_path=data.get("preview_path"),
            replay_png=data.get("replay_png"),
            error=data.get("error"),
            seconds=data.get("seconds"),
        )


def exit_code_for(counts: dict[str, int], fail_on: str) -> int:
    """0, 1 or 5 from the outcome counts (see :data:`EXIT_CODES`); 2, 3, 4 and 130 end a run before any report
    exists. A run where every preview was SKIPPED (or that had none) checked nothing: green would be a lie."""
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on must be one of {FAIL_ON}, got {fail_on!r}")
    failing = [Outcome.FAIL, Outcome.ERROR] + ([Outcome.DRIFT] if fail_on == "drift" else [])
    if any(counts.get(o.value, 0) for o in failing):
        return 1
    if not any(counts.get(o.value, 0) for o in Outcome if o is not Outcome.SKIPPED):
        return NOTHING_CHECKED
    return 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class CheckReport:
    """A finished ``parity check``: the run's context, the thresholds applied and every preview's result."""

    tool_version: str
    job_dir: str
    job_name: str
    base_model: str
    device: str
    dtype: str
    pipeline_profile: str  # which reproduction of ai-toolkit's sampling was used, e.g. "aitoolkit-omnigen2"
    noise_algorithm: str  # e.g. "torch-2.11-cpu-bf16"
    noise_algorithm_reason: str  # how it was chosen: flag, detected from the job, default, ...
    thresholds: Thresholds = field(default_factory=Thresholds)
    fail_on: str = "fail"
    items: list[PreviewResult] = field(default_factory=list)
    created: str = field(default_factory=_now)  # ISO 8601, UTC
    warnings: list[str] = field(default_factory=list)  # run-level notes (from the plan)
    ssim_convention: dict[str, Any] = field(default_factory=lambda: dict(SSIM_CONVENTION))
    kernels: str = "torch"  # the kernel profile replays ran with (pipelines.omnigen2.kernels spec)
    kernels_reason: str = ""  # how it was chosen
    kernel_trials: list[dict[str, Any]] = field(default_factory=list)  # each profile tried on a step-0 preview
    fast_drift: dict[str, Any] | None = None  # --fast: measured against exact mode on the same previews
    job_causes: list[Cause] = field(default_factory=list)  # knobs proven by experiment, once for the job
    lora_effects: list[dict[str, Any]] = field(default_factory=list)  # per checked round: LoRA on vs off
    seed_recovery: dict[str, Any] | None = None  # drawn seeds found by replay (parity.check.recovery_summary)
    diagnosis: dict[str, Any] | None = None  # what diagnosis cost (parity.check.diagnosis_summary)

    def __post_init__(self):
        if self.fail_on not in FAIL_ON:
            raise ValueError(f"fail_on must be one of {FAIL_ON}, got {self.fail_on!r}")

    @property
    def counts(self) -> dict[str, int]:
        """Previews per outcome, every outcome present (zeros included), best first."""
        counts = {o.value: 0 for o in Outcome}
        for item in self.items:
            counts[item.outcome.value] += 1
        return counts

    @property
    def proven_mismatches(self) -> list[Cause]:
        """Settings shown by experiment to differ from what made a preview: each fails the run, even where the
        previews it concerns PASS on SSIM."""
        found = {c.code: c for c in self.job_causes if c.evidence.get("proven")}
        for item in self.items:
            for cause in item.causes:
                if cause.evidence.get("proven") and cause.severity == "error":
                    found.setdefault(cause.code, cause)
        return list(found.values())

    @property
    def exit_code(self) -> int:
        code = exit_code_for(self.counts, self.fail_on)
        return 1 if code == 0 and self.proven_mismatches else code

    @property
    def nothing_checked(self) -> str | None:
        """Why no preview was replayed or scored, in one line; None when some were."""
        if self.exit_code != NOTHING_CHECKED:
            return None
        if not self.items:
            return "nothing was checked: no previews were selected"
        first = self.items[0]
        more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
        reason = first.reason.removeprefix("not replayable: ") or "not replayed"
        count = f"{len(self.items)} selected preview{'s' if len(self.items) != 1 else ''}"
        return f"nothing was checked: {count}, none could be replayed; {first.preview_file}: {reason}{more}"

    @property
    def causes_summary(self) -> list[CauseSummary]:
        """Each cause once, with the previews it was found for; errors first, then by count."""
        from parity.catalogue import summary_title

        found: dict[str, tuple[Cause, list[str], list[str]]] = {}
        for item in self.items:
            for cause in item.causes:
                entry = found.setdefault(cause.code, (cause, [], []))
                entry[1].append(item.preview_file)
                entry[2].append(cause.title)
        summaries = [
            CauseSummary(c.code, c.severity, summary_title(c.code, titles), c.fix, tuple(previews))
            for c, previews, titles in found.values()
        ]
        return sorted(summaries, key=lambda s: (-SEVERITIES.index(s.severity), -s.count, s.code))

    @property
    def base_drift(self) -> dict[str, Any] | None:
        """The step-0 previews (base model alone: only the kernels and the noise set their pixels): how many
        replayed identically, the largest difference and the lowest SSIM. A step-0 preview that an experiment
        proved was made with another setting measures that setting, not the machine: it is counted apart
        (``proven_wrong``). None without any scored."""
        scored = [i for i in self.items if i.step == 0 and i.score is not None
                  and i.settings.get("weights", "base") == "base"]
        wrong = [i for i in scored if any(c.evidence.get("proven") for c in i.causes)]
        machine = [i for i in scored if i not in wrong]
        if not machine:
            return None
        return {
            "previews": len(machine),
            "identical": sum(i.score.verdict.value == "EXACT" for i in machine),
            "max_abs_diff": max(int(i.score.metrics.max_abs_diff) for i in machine),
            "ssim_min": round(min(float(i.score.metrics.ssim) for i in machine), 5),
            "proven_wrong": len(wrong),
        }

    def worst(self, n: int = 5) -> list[PreviewResult]:
        """The n previews that need attention most: by outcome, then lowest SSIM. EXACT and PASS excluded."""
        bad = [i for i in self.items if i.outcome not in (Outcome.EXACT, Outcome.PASS, Outcome.SKIPPED)]
        bad.sort(key=lambda i: (i.outcome.rank, i.score.metrics.ssim if i.score else -1.0, i.preview_file))
        return bad[:n]

    def is_failure(self, item: PreviewResult) -> bool:
        """Whether this preview makes the run fail under ``fail_on``."""
        failing = {Outcome.FAIL, Outcome.ERROR} | ({Outcome.DRIFT} if self.fail_on == "drift" else set())
        return item.outcome in failing

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": {"name": "parity", "version": self.tool_version},
            "created": self.created,
            "job": {"dir": self.job_dir, "name": self.job_name},
            "base_model": self.base_model,
            "device": self.device,
            "dtype": self.dtype,
            "pipeline_profile": self.pipeline_profile,
            "noise": {"algorithm": self.noise_algorithm, "chosen_by": self.noise_algorithm_reason},
            "kernels": {"profile": self.kernels, "chosen_by": self.kernels_reason,
                        "trials": [dict(t) for t in self.kernel_trials]},
            "measured_drift": {"step0": self.base_drift, "fast": self.fast_drift},
            "seed_recovery": self.seed_recovery,
            "diagnosis": self.diagnosis,
            "thresholds": self.thresholds.to_dict(),
            "ssim_convention": dict(self.ssim_convention),
            "fail_on": self.fail_on,
            "exit_code": self.exit_code,
            "exit_codes": {str(k): v for k, v in EXIT_CODES.items()},
            "counts": self.counts,
            "causes_summary": [s.to_dict() for s in self.causes_summary],
            "job_causes": [c.to_dict() for c in self.job_causes],
            "lora_effects": [dict(e) for e in self.lora_effects],
            "warnings": list(self.warnings),
            "previews": [i.to_dict() for i in self.items],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckReport:
        """Read back what ``to_dict`` wrote; derived fields (counts, exit code, causes summary) are recomputed."""
        return cls(
            tool_version=data["tool"]["version"],
            created=data.get("created") or _now(),
            job_dir=data["job"]["dir"],
            job_name=data["job"]["name"],
            base_model=data.get("base_model", ""),
            device=data.get("device", ""),
            dtype=data.get("dtype", ""),
            pipeline_profile=data.get("pipeline_profile", ""),
            noise_algorithm=data["noise"]["algorithm"],
            noise_algorithm_reason=data["noise"]["chosen_by"],
            thresholds=Thresholds.from_dict(data.get("thresholds") or {}),
            fail_on=data.get("fail_on", "fail"),
            items=[
                i if isinstance(i, PreviewResult) else PreviewResult.from_dict(i) for i in data["previews"]
            ],
            warnings=list(data.get("warnings") or []),
            ssim_convention=dict(data.get("ssim_convention") or SSIM_CONVENTION),
            kernels=(data.get("kernels") or {}).get("profile", "torch"),
            kernels_reason=(data.get("kernels") or {}).get("chosen_by", ""),
            kernel_trials=list((data.get("kernels") or {}).get("trials") or []),
            fast_drift=(data.get("measured_drift") or {}).get("fast"),
            job_causes=[Cause.from_dict(c) for c in data.get("job_causes") or []],
            lora_effects=list(data.get("lora_effects") or []),
            seed_recovery=data.get("seed_recovery"),
            diagnosis=data.get("diagnosis"),
        )
