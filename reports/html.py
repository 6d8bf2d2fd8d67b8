"""``report.html``: one self-contained page (images inlined, CSS and JS inline, no network).

Reading order (after reg-cli and Playwright's reporter): the verdict of the run and the counts first, then the
worst previews and the causes, a step x prompt overview of thumbnails coloured by verdict (like ai-toolkit's
sample overview, each linking to its card), the SSIM-over-steps chart, and a card per preview behind filters by
verdict: preview | replay | difference | SSIM map side by side at display size (``reports/display.py``; the
full-resolution files open from the card), a slider and a blink view, the metrics against their thresholds, the
settings the replay used, findings and causes with their evidence. EXACT cards start collapsed: with hundreds of
previews the page is read for what differs. Everything that comes from user data is escaped
(jinja2 autoescape); a Content-Security-Policy allows only the page's own script and style (by hash) and data:
images, so even a missed escape could not load or run anything.

The images of a card (reduced and encoded: most of a big report's time) can be made ahead, where each replay
finishes (``save_card_images``, on every rank under torchrun); rendering then reads them back. The page is the
same byte for byte either way.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup, escape

from parity.errors import InputError
from parity.results import EXIT_CODES, CheckReport, PreviewResult
from parity.scores import comparison_images, compute_metrics, load_rgb
from reports.chart import PALETTE, series, ssim_chart
from reports.display import average_blocks, data_uri, reduced_size, reduction, thumbnail_uri, worst_of_blocks
from reports.heatmap import colormap, diff_heatmap, diff_scale, ssim_heatmap

TEMPLATES = Path(__file__).resolve().parent / "templates"
_PIXELATED_BELOW = 400  # px: smaller images (shown as they are) are enlarged with hard pixel edges

OUTCOME_MEANING = {
    "EXACT": "identical decoded pixels",
    "PASS": "differs at rounding level only",
    "DRIFT": "same picture, visibly different detail",
    "FAIL": "different or misaligned picture",
    "SKIPPED": "cannot be replayed",
    "ERROR": "the replay crashed",
}

# The order a reader wants the settings in; anything else follows alphabetically.
SETTINGS_ORDER = (
    "prompt",
    "negative_prompt",
    "seed",
    "seed_source",
    "seed_offset",
    "seed_confirmed_by",
    "seed_recovery",
    "width",
    "height",
    "gen_width",
    "gen_height",
    "num_inference_steps",
    "guidance_scale",
    "network_multiplier",
    "weights",
    "checkpoint",
    "lora_merged",
    "ctrl_img",
)


@dataclass
class MetricRow:
    label: str
    value: str
    threshold: str = ""
    ok: bool | None = None  # None: informational, no threshold


@dataclass
class Card:
    item: PreviewResult
    anchor: str
    outcome: str
    failing: bool
    images: dict[str, str] = field(default_factory=dict)  # name -> data: URI
    pixelated: bool = False
    size: tuple[int, int] | None = None  # the preview's own size
    display: tuple[int, int] | None = None  # the size the card's images are shown at
    preview_href: str | None = None  # the full-resolution files, relative to report.html
    replay_href: str | None = None
    image_note: str = ""
    metrics: list[MetricRow] = field(default_factory=list)
    settings: list[tuple[str, str]] = field(default_factory=list)


def _anchor(item: PreviewResult, index: int) -> str:
    return f"p{index}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", item.preview_file)[:80]


def _fmt(value: Any) -> str:
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if value == "":
        return '"" (empty)'
    return str(value)


def _settings_rows(settings: dict[str, Any]) -> list[tuple[str, str]]:
    keys = [k for k in SETTINGS_ORDER if k in settings]
    keys += sorted(k for k in settings if k not in SETTINGS_ORDER)
    return [(k, _fmt(settings[k])) for k in keys]


def _metric_rows(report: CheckReport, item: PreviewResult) -> list[MetricRow]:
    m, t = item.score.metrics, report.thresholds
    psnr = "\u221e (identical)" if math.isinf(m.psnr_db) else f"{m.psnr_db:.2f} dB"
    return [
        MetricRow(
            "SSIM",
            f"{m.ssim:.5f}",
            f"PASS \u2265 {t.pass_min_ssim:g}, DRIFT \u2265 {t.drift_min_ssim:g}",
            m.ssim >= t.pass_min_ssim,
        ),
        MetricRow("PSNR", psnr, f"PASS \u2265 {t.pass_min_psnr_db:g} dB", m.psnr_db >= t.pass_min_psnr_db),
        MetricRow("mean abs difference", f"{m.mean_abs_diff:.3f} of 255"),
        MetricRow("max abs difference", f"{m.max_abs_diff} of 255"),
        MetricRow("pixels off by > 8 levels", f"{100 * m.share_off_by_more_than_8:.2f} %"),
        MetricRow(
            f"SSIM at 1/8 ({m.eighth_size[0]}\u00d7{m.eighth_size[1]})",
            f"{m.ssim_eighth:.4f}",
            f"same composition \u2265 {t.same_composition_min_ssim_eighth:g}",
            None,
        ),
        MetricRow("SSIM window", f"{m.ssim_win_size} (1/8: {m.ssim_eighth_win_size})"),
    ]


@dataclass
class CardImages:
    """What a preview card shows as pictures: data: URIs by name (preview, replay, diff, ssim at display size;
    thumb for the overview), the preview's size, the display size and a note when an image is missing. The
    costly part of a report (reducing and encoding five images per preview), so ``parity check`` makes it on its
    worker thread as each replay finishes (``save_card_images``) and the report only reads it back
    (``PreviewResult.card_file``)."""

    images: dict[str, str] = field(default_factory=dict)
    size: tuple[int, int] | None = None
    note: str = ""
    display: tuple[int, int] | None = None

    def to_bytes(self) -> bytes:
        """A card file: a magic line, a JSON line (sizes, note, image names), then one ``name data:URI`` line per
        image in that order (copied as they are into report.html, never parsed)."""
        head = json.dumps({"size": self.size, "display": self.display, "note": self.note,
                           "names": list(self.images)})
        lines = [CARD_FILE_MAGIC, head] + [f"{name} {uri}" for name, uri in self.images.items()]
        return "\n".join(lines).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> CardImages:
        head, images = card_file_parts(data)
        return cls({name: data[a:b].decode("ascii") for name, (a, b) in images.items()}, head.size, head.note,
                   head.display)


CARD_FILE_MAGIC = "parity-card 3"
CARDS_FOLDER = ".parity-cards"  # in the report folder: per-run, consumed (deleted) by write_reports


def card_images(item: PreviewResult) -> CardImages:
    """The preview, the replay encoded like it and the two heatmaps at display size, and the overview thumbnail."""
    card = CardImages()
    if item.preview_path is None or not item.preview_path.is_file():
        card.note = "The preview image is not available."
        return card
    try:
        if item.score is None or item.replay_png is None or not item.replay_png.is_file():
            preview = load_rgb(item.preview_path)
            replay = None
            if item.score is not None:
                card.note = "The replay image is not available."
        else:
            preview, replay, _ = comparison_images(
                item.preview_path, load_rgb(item.replay_png), item.score.encoding
            )
            diff_map, ssim_map = item.score.diff_map, item.score.ssim_map
            if diff_map is None or ssim_map is None or diff_map.shape != preview.shape[:2]:
                _, ssim_map, diff_map = compute_metrics(preview, replay)
    except InputError as exc:
        return CardImages(note=f"The images could not be read: {exc.line()}")
    card.size = (preview.shape[1], preview.shape[0])
    factor = reduction(card.size)
    card.display = reduced_size(card.size, factor)
    lossy = factor > 1
    card.images["preview"] = data_uri(average_blocks(preview, factor), lossy)
    if replay is not None:
        card.images.update(
            replay=data_uri(average_blocks(replay, factor), lossy),
            diff=data_uri(diff_heatmap(worst_of_blocks(diff_map, factor, "max")), lossy),
            ssim=data_uri(ssim_heatmap(worst_of_blocks(ssim_map, factor, "min")), lossy),
        )
    card.images["thumb"] = thumbnail_uri(preview)
    return card


def save_card_images(item: PreviewResult, out_dir: Path) -> Path:
    """Make ``item``'s card images now and write them under ``out_dir`` (the report folder, shared by every
    rank under torchrun); returns the file for ``PreviewResult.card_file``. Written atomically: a reader sees
    a complete file or none."""
    folder = Path(out_dir) / CARDS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    data = card_images(item).to_bytes()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", item.preview_file)[:80]
    path = folder / f"{name}-{hashlib.sha256(item.preview_file.encode()).hexdigest()[:12]}.card"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".card")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def card_file_head(handle) -> CardImages:
    """A card file's size, note and image names (``images`` maps each name to ""), read from its first lines."""
    if handle.readline().rstrip(b"\n") != CARD_FILE_MAGIC.encode():
        raise ValueError("not a parity card file of this version")
    head = json.loads(handle.readline())
    size, display = head.get("size"), head.get("display")
    return CardImages({str(name): "" for name in head["names"]}, (int(size[0]), int(size[1])) if size else None,
                      str(head.get("note") or ""), (int(display[0]), int(display[1])) if display else None)


def card_file_parts(data: bytes) -> tuple[CardImages, dict[str, tuple[int, int]]]:
    """A card file's head and where each image's data: URI lies in ``data`` (start, end: nothing copied);
    ValueError when it is not a complete card file of this version or holds anything but ASCII."""
    if not data.isascii():
        raise ValueError("a card file is ASCII")
    stream = io.BytesIO(data)
    head = card_file_head(stream)
    pos, images = stream.tell(), {}
    for name in head.images:
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        label = f"{name} ".encode()
        if not data.startswith(label, pos):
            raise ValueError(f"card file: image {name!r} missing")
        images[name] = (pos + len(label), end)
        pos = end + 1
    return head, images


def _read_card_file(path: Path | None) -> CardImages | None:
    """A card file made for this run, or None (absent or unreadable: the report then makes the images itself)."""
    if path is None:
        return None
    try:
        return CardImages.from_bytes(Path(path).read_bytes())
    except (OSError, ValueError, TypeError, IndexError, KeyError):
        return None


def _unchanged_by_escaping(text: str) -> str:
    """``text`` as Markup when escaping would leave it as it is (a base64 data: URI always), so the template
    copies it instead of escaping megabytes character by character; the page's bytes are the same either way."""
    return text if any(ch in text for ch in "&<>\"'") else Markup(text)


def _card_images(card: Card) -> None:
    """Fill ``card``'s pictures: from the file made on the worker thread, else made here."""
    found = _read_card_file(card.item.card_file) or card_images(card.item)
    card.images = {name: _unchanged_by_escaping(uri) for name, uri in found.images.items()}
    card.image_note = found.note
    card.size, card.display = found.size, found.display
    card.pixelated = _pixelated(found)


def _pixelated(images: CardImages) -> bool:
    """Shown as they are and small: enlarged with hard pixel edges, so each pixel can be seen."""
    return images.size is not None and images.size == images.display and images.size[0] < _PIXELATED_BELOW


def _card_head(card: Card, splice: dict) -> bool:
    """With ``splice``: take a card file's size, note and image names now and leave a mark where each image goes
    (``html_bytes`` copies the image there from the file); False when there is no readable card file."""
    path = card.item.card_file
    if path is None:
        return False
    try:
        with open(path, "rb") as handle:
            head = card_file_head(handle)
    except (OSError, ValueError, TypeError, IndexError, KeyError):
        return False
    token = splice["token"]
    splice["cards"][card.anchor] = card.item
    card.images = {name: Markup(f"{token}{card.anchor}|{name}{token}") for name in head.images}
    card.image_note, card.size, card.display = head.note, head.size, head.display
    card.pixelated = _pixelated(head)
    return True


def _href(path: Path | None, out_dir: Path | None) -> str | None:
    """A link from report.html (in ``out_dir``) to a file on disk, relative so the folder can move."""
    if path is None or out_dir is None:
        return None
    relative = os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())
    return urllib.parse.quote(Path(relative).as_posix())


def _cards(report: CheckReport, splice: dict | None = None, out_dir: Path | None = None) -> list[Card]:
    cards = []
    for index, item in enumerate(report.items):
        card = Card(
            item=item,
            anchor=_anchor(item, index),
            outcome=item.outcome.value,
            failing=report.is_failure(item),
            settings=_settings_rows(item.settings),
            preview_href=_href(item.preview_path, out_dir),
            replay_href=_href(item.replay_png, out_dir) if item.score is not None else None,
        )
        if item.score is not None:
            card.metrics = _metric_rows(report, item)
        cards.append(card)
    if splice is not None:
        cards_left = [card for card in cards if not _card_head(card, splice)]
    else:
        cards_left = cards
    # Encoding the images is most of a big report's time: cards are independent, so in threads.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(_card_images, cards_left))
    return cards


def _scale_svg(uid: str) -> Markup:
    """The difference heatmap's colour scale (square root of the level difference)."""
    stops = "".join(
        f'<stop offset="{v:.3f}" stop-color="rgb({r},{g},{b})"/>'
        for v, (r, g, b) in zip(np.linspace(0, 1, 12), colormap(np.linspace(0, 1, 12)), strict=True)
    )
    ticks = "".join(
        f'<text x="{8 + 224 * float(diff_scale(level)):.1f}" y="24" font-size="9" text-anchor="{anchor}" '
        f'fill="#5f6368">{level}</text>'
        for level, anchor in ((0, "start"), (8, "middle"), (32, "middle"), (128, "middle"), (255, "end"))
    )
    return Markup(
        f'<svg class="scalebar" viewBox="0 0 240 28" width="240" height="28" role="img" '
        f'aria-label="difference colour scale from 0 to 255 levels, square-root spaced">'
        f'<defs><linearGradient id="g-{uid}">{stops}</linearGradient></defs>'
        f'<rect x="8" y="2" width="224" height="10" fill="url(#g-{uid})"/>{ticks}</svg>'
    )


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every {{ }} is escaped unless it is Markup built here
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    env.globals["scale_svg"] = _scale_svg
    return env


@dataclass
class OverviewRow:
    """One training step of the overview: per prompt index (the columns), that step's cards (usually one)."""

    step: int
    cells: list[list[Card]]


def _overview(cards: list[Card]) -> tuple[list[int], list[OverviewRow]]:
    """The step x prompt grid of ai-toolkit's sample overview: the prompt indices (columns) and a row per step."""
    prompts = sorted({card.item.prompt_index for card in cards})
    steps = sorted({card.item.step for card in cards})
    cell: dict[tuple[int, int], list[Card]] = {}
    for card in cards:
        cell.setdefault((card.item.step, card.item.prompt_index), []).append(card)
    return prompts, [OverviewRow(step, [cell.get((step, p), []) for p in prompts]) for step in steps]


def render_html(report: CheckReport, out_dir: str | Path | None = None) -> str:
    """The text of report.html (``out_dir``: the folder it will be in, for links to the full-resolution files)."""
    return "".join(html_chunks(report, out_dir=out_dir))


def html_chunks(report: CheckReport, splice: dict | None = None, out_dir: str | Path | None = None) -> Iterator[str]:
    """The text of report.html in pieces, in order: written out as they come, a big report is never held as one
    string. (``splice``: see ``html_bytes``; ``out_dir``: see ``render_html``.)"""
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    js = (TEMPLATES / "report.js").read_text(encoding="utf-8")
    csp = (
        "default-src 'none'; img-src data:; "
        f"style-src {_csp_hash(css)}; script-src {_csp_hash(js)}; "
        "base-uri 'none'; form-action 'none'"
    )
    chart_series = series(report)
    cards = _cards(report, splice, Path(out_dir) if out_dir is not None else None)
    card_of = {id(card.item): card for card in cards}
    prompts, overview = _overview(cards)
    template = _environment().get_template("report.html.jinja")
    return template.generate(
        report=report,
        counts=report.counts,
        outcome_meaning=OUTCOME_MEANING,
        worst=[card_of[id(item)] for item in report.worst()],
        causes=report.causes_summary,
        cards=cards,
        overview=overview,
        overview_prompts=prompts,
        chart=ssim_chart(report),
        chart_series=chart_series,
        palette_size=len(PALETTE),
        exit_codes=EXIT_CODES,
        css=Markup(css),
        js=Markup(js),
        csp=csp,
    )


def html_bytes(report: CheckReport, out_dir: str | Path | None = None) -> Iterator[bytes | memoryview]:
    """report.html as UTF-8 in pieces, for writing it: the bytes of ``render_html``, but each image made ahead
    (``save_card_images``) is copied from its card file as it is, never decoded, split or escaped."""
    splice = {"token": uuid.uuid4().hex, "cards": {}}  # the token marks where an image goes: no text holds it
    token, loaded = splice["token"], {}
    for chunk in html_chunks(report, splice, out_dir):
        if token not in chunk:
            yield chunk.encode("utf-8")
            continue
        for number, piece in enumerate(chunk.split(token)):
            if number % 2 == 0:
                yield piece.encode("utf-8")
            else:
                anchor, name = piece.rsplit("|", 1)
                yield _spliced_image(splice["cards"][anchor], name, loaded)


def _spliced_image(item: PreviewResult, name: str, loaded: dict) -> bytes | memoryview:
    """One image of ``item``'s card file as it goes into the page (``loaded`` keeps the last card file read)."""
    if loaded.get("path") != item.card_file:
        loaded.clear()
        loaded["path"] = item.card_file
        try:
            loaded["data"] = Path(item.card_file).read_bytes()
            loaded["images"] = card_file_parts(loaded["data"])[1]
        except (OSError, ValueError, TypeError, IndexError, KeyError):  # gone or damaged since: make it here
            made = card_images(item).images
            loaded["data"] = "\n".join(made.values()).encode("utf-8")
            loaded["images"], start = {}, 0
            for key, uri in made.items():
                loaded["images"][key] = (start, start + len(uri.encode("utf-8")))
                start += len(uri.encode("utf-8")) + 1
    data = loaded["data"]
    start, end = loaded["images"].get(name, (0, 0))
    if any(data.find(ch, start, end) >= 0 for ch in (b"&", b"<", b">", b'"', b"'")):
        # never in a data: URI this module wrote: escaped like any other text
        return str(escape(data[start:end].decode("utf-8"))).encode("utf-8")
    return memoryview(data)[start:end]
