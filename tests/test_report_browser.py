"""report.html in a real browser (headless Chromium): no errors, no network, working keyboard controls, verdict
filters, collapsed EXACT cards and the step x prompt overview."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_reports import EXPECTED, XSS_PROMPT, sample_report

from parity.results import Outcome
from reports import write_reports

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    report, out = sample_report(tmp_path_factory.mktemp("browser"))
    return report, write_reports(report, out)["html"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A page with everything it logged and requested recorded."""

    def __init__(self, browser, url: str, javascript: bool = True):
        self.context = browser.new_context(
            java_script_enabled=javascript, viewport={"width": 1300, "height": 900}
        )
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(url, wait_until="load")


@pytest.fixture
def page(browser, report_file):
    opened = Page(browser, report_file[1].as_uri())
    yield opened
    opened.context.close()


def test_no_console_errors_no_network_and_no_injected_script(page):
    page.page.wait_for_timeout(200)
    assert [m for m in page.console if m.startswith(("error", "pageerror", "warning"))] == []
    assert page.requests and all(u.startswith(("data:", "file:")) for u in page.requests), page.requests
    assert page.dialogs == []  # the <script>/onerror prompt did not run


def test_one_card_per_preview_with_its_verdict(page, report_file):
    report, _ = report_file
    cards = page.page.locator("article.card")
    assert cards.count() == len(report.items)
    for i, item in enumerate(report.items):
        card = cards.nth(i)
        assert card.locator(".verdict").inner_text() == item.outcome.value
        assert item.preview_file in card.locator("h3").inner_text()
    assert page.page.locator(".count").count() == len(EXPECTED)
    assert XSS_PROMPT in page.page.locator("article.card").nth(3).locator(".prompt").inner_text()


def test_every_image_is_decoded(page):
    page.page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    sizes = page.page.evaluate(
        "Array.from(document.images).map(i => [i.alt, i.naturalWidth, i.naturalHeight])"
    )
    assert len(sizes) > 20
    assert [s for s in sizes if s[1] == 0 or s[2] == 0] == []


def test_slider_moves_with_the_keyboard_and_moves_the_overlay(page):
    slider = page.page.locator("details[open] [data-slider] input[type=range]").first  # EXACT cards are closed
    overlay = page.page.locator("details[open] [data-slider] .over").first
    clip_before = overlay.evaluate("e => getComputedStyle(e).clipPath")
    value_before = slider.input_value()
    slider.focus()
    page.page.keyboard.press("ArrowRight")
    page.page.keyboard.press("ArrowRight")
    assert int(slider.input_value()) == int(value_before) + 2
    clip_after = overlay.evaluate("e => getComputedStyle(e).clipPath")
    assert clip_after != clip_before and "48%" in clip_after
    assert "52%" in slider.get_attribute("aria-valuetext")


def test_blink_toggles_with_the_keyboard(page):
    box = page.page.locator("details[open] [data-blink]").first
    button, replay, state = box.locator("button"), box.locator(".blink-replay"), box.locator(".blink-state")
    assert replay.is_hidden() and button.get_attribute("aria-pressed") == "false"
    button.focus()
    page.page.keyboard.press("Enter")
    assert replay.is_visible() and button.get_attribute("aria-pressed") == "true"
    assert state.inner_text() == "Showing: replay"
    page.page.keyboard.press("Space")
    assert replay.is_hidden() and state.inner_text() == "Showing: preview"


def test_exact_cards_start_collapsed_and_the_others_open(page, report_file):
    report, _ = report_file
    opened = page.page.eval_on_selector_all("article.card", "cards => cards.map(c => c.querySelector('details.body').open)")
    assert opened == [item.outcome is not Outcome.EXACT for item in report.items]
    exact = page.page.locator("article.card.EXACT").first
    assert exact.locator(".images").is_hidden() and exact.locator(".prompt").is_visible()
    exact.locator("summary").click()
    assert exact.locator(".images").is_visible()


def test_verdict_filters_hide_and_show_cards(page, report_file):
    report, _ = report_file
    fail = page.page.locator("[data-filters] input[value=FAIL]")
    labels = page.page.locator("[data-filters] label").all_inner_texts()
    assert [label.split() for label in labels] == [[o, str(n)] for o, n in EXPECTED.items()]
    assert page.page.locator(".filter-state").inner_text() == "8 of 8 previews shown"
    fail.uncheck()
    hidden = page.page.eval_on_selector_all("article.card", "cards => cards.map(c => c.hidden)")
    assert hidden == [item.outcome is Outcome.FAIL for item in report.items]
    assert page.page.locator("article.card.FAIL").first.is_hidden()
    assert page.page.locator(".filter-state").inner_text() == "6 of 8 previews shown"
    fail.check()
    assert page.page.locator("article.card:visible").count() == len(report.items)


def test_overview_lays_out_steps_by_prompts_each_thumbnail_in_its_verdicts_colour(page, report_file):
    report, _ = report_file
    assert page.page.locator("#overview thead th").all_inner_texts() == ["step", "prompt 0", "prompt 1", "prompt 2"]
    rows = page.page.locator("#overview tbody tr")
    assert [rows.nth(r).locator("th").inner_text() for r in range(rows.count())] == ["0", "250", "500"]
    colours = {"EXACT": "rgb(11, 107, 58)", "FAIL": "rgb(197, 34, 31)", "ERROR": "rgb(142, 36, 170)"}
    for item in report.items:
        row = ["0", "250", "500"].index(str(item.step))
        thumb = rows.nth(row).locator("td").nth(item.prompt_index).locator("a.thumb")
        card_id = thumb.get_attribute("href")[1:]
        card = page.page.locator(f"article.card[id='{card_id}']")
        assert item.preview_file in card.locator("h3").inner_text()
        assert thumb.get_attribute("class") == f"thumb {item.outcome.value}"
        assert thumb.locator(".tag").inner_text() == item.outcome.value
        if item.outcome.value in colours:
            assert thumb.evaluate("a => getComputedStyle(a).borderTopColor") == colours[item.outcome.value]
    # The first screen still leads with the banner and the worst previews; the overview follows the summary.
    banner, worst = page.page.locator("#summary .banner"), page.page.locator("#summary table").first
    assert banner.bounding_box()["y"] < worst.bounding_box()["y"] < 900
    assert page.page.locator("#summary").bounding_box()["y"] < page.page.locator("#overview").bounding_box()["y"]
    assert page.page.locator("#overview").bounding_box()["y"] < page.page.locator("#chart").bounding_box()["y"]


def test_a_thumbnail_opens_its_card_even_when_filtered_out_or_collapsed(page):
    page.page.locator("[data-filters] input[value=EXACT]").uncheck()
    card = page.page.locator("article.card.EXACT").first
    assert card.is_hidden()
    card_id = card.get_attribute("id")
    page.page.locator(f"#overview a[href='#{card_id}']").click()
    assert card.is_visible() and card.locator("details.body").evaluate("d => d.open")
    assert page.page.locator("[data-filters] input[value=EXACT]").is_checked()
    assert page.page.evaluate("location.hash") == f"#{card_id}"
    top = card.bounding_box()["y"]
    assert 0 <= top < 900  # scrolled to it


def test_static_parts_read_without_javascript(browser, report_file):
    report, path = report_file
    opened = Page(browser, path.as_uri(), javascript=False)
    try:
        page = opened.page
        assert page.locator("article.card").count() == len(report.items)
        assert page.locator("#summary .banner").inner_text().startswith("Parity failed")
        assert page.locator("svg.chart circle").count() == sum(1 for i in report.items if i.score)
        assert page.locator(".interactive").first.is_hidden()  # needs JS, so it is not shown
        assert page.locator(".filters").is_hidden() and page.locator("article.card:visible").count() == len(report.items)
        assert page.locator("#overview a.thumb").count() == len(report.items)
        static = page.evaluate(
            "Array.from(document.querySelectorAll('.images img')).map(i => i.naturalWidth)"
        )
        assert static and all(w > 0 for w in static)
        assert opened.console == [] and all(u.startswith(("data:", "file:")) for u in opened.requests)
    finally:
        opened.context.close()
