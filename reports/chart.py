"""SSIM over training steps, one line per prompt: an inline SVG drawn here, so it needs no JavaScript."""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

from parity.results import CheckReport, Outcome

# Distinguishable on white and for common colour-vision deficiencies (Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

_W, _H = 760, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 16, 44


@dataclass(frozen=True)
class Series:
    prompt_index: int
    prompt: str
    color: str
    points: tuple[tuple[int, float, str, str], ...]  # (step, ssim, outcome, preview file)


def series(report: CheckReport) -> list[Series]:
    """Scored previews grouped by prompt index, ordered by step."""
    by_prompt: dict[int, list] = {}
    prompts: dict[int, str] = {}
    for item in report.items:
        prompts.setdefault(item.prompt_index, item.prompt)
        if item.score is None:
            continue
        ssim = 1.0 if item.outcome is Outcome.EXACT else item.score.metrics.ssim
        by_prompt.setdefault(item.prompt_index, []).append(
            (item.step, ssim, item.outcome.value, item.preview_file)
        )
    return [
        Series(i, prompts[i], PALETTE[n % len(PALETTE)], tuple(sorted(by_prompt[i])))
        for n, i in enumerate(sorted(by_prompt))
    ]


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def ssim_chart(report: CheckReport) -> Markup:
    """The chart as SVG markup; every text from user data is escaped."""
    lines = series(report)
    if not lines:
        return Markup('<p class="muted">No preview was scored, so there is nothing to chart.</p>')
    steps = sorted({p[0] for s in lines for p in s.points})
    values = [p[1] for s in lines for p in s.points]
    th = report.thresholds
    y_lo = min(math.floor(min(values + [th.drift_min_ssim]) * 10) / 10 - 0.05, 0.85)
    y_lo = max(0.0, y_lo)
    x_lo, x_hi = steps[0], steps[-1]
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(step: float) -> float:
        return _LEFT + (step - x_lo) / (x_hi - x_lo) * plot_w

    def y(value: float) -> float:
        return _TOP + (1.0 - (max(value, y_lo) - y_lo) / (1.0 - y_lo)) * plot_h

    out = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-labelledby="chart-title chart-desc" '
        'xmlns="http://www.w3.org/2000/svg">',
        '<title id="chart-title">SSIM over training steps, one line per prompt</title>',
        f'<desc id="chart-desc">SSIM of each replay against its preview (EXACT drawn at 1). Dashed lines: '
        f"PASS needs SSIM at least {th.pass_min_ssim:g}, DRIFT at least {th.drift_min_ssim:g}.</desc>",
    ]
    for tick in _nice_ticks(y_lo, 1.0):
        out.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e3e3e3"/>'
            f'<text x="{_LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#555">{tick:.2f}</text>'
        )
    x_ticks = steps if len(steps) <= 10 else [int(t) for t in _nice_ticks(steps[0], steps[-1])]
    for tick in x_ticks:
        out.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h + 4}" '
            f'stroke="#555"/><text x="{x(tick):.1f}" y="{_TOP + plot_h + 17}" text-anchor="middle" '
            f'font-size="11" fill="#555">{tick}</text>'
        )
    out.append(
        f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_H - 6}" text-anchor="middle" font-size="12" '
        'fill="#333">training step</text>'
        f'<text transform="translate(14 {_TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
        'font-size="12" fill="#333">SSIM</text>'
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
    )
    for value, label in ((th.pass_min_ssim, "PASS"), (th.drift_min_ssim, "DRIFT")):
        if value >= y_lo:
            out.append(
                f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                f'stroke="#777" stroke-dasharray="5 4"/><text x="{_W - _RIGHT - 4}" y="{y(value) - 4:.1f}" '
                f'text-anchor="end" font-size="10" fill="#555">{label} \u2265 {value:g}</text>'
            )
    for s in lines:
        coords = " ".join(f"{x(p[0]):.1f},{y(p[1]):.1f}" for p in s.points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="2"/>')
        for step, value, outcome, file in s.points:
            tip = escape(f"prompt {s.prompt_index}, step {step}: SSIM {value:.4f} {outcome} ({file})")
            out.append(
                f'<circle cx="{x(step):.1f}" cy="{y(value):.1f}" r="4.5" fill="{s.color}" stroke="#fff" '
                f'stroke-width="1.5"><title>{tip}</title></circle>'
            )
    out.append("</svg>")
    return Markup("".join(out))
