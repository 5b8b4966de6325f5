"""The app in headless Chromium: every tab visited, one action each, screenshots, no request off this machine.

Set VGGKIT_UPDATE_SCREENSHOTS=1 to also copy the screenshots (downsized) to assets/screenshots/
for the README.
"""

import os
import re
import shutil
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from PIL import Image

from app_server import EXAMPLES, ROOT, TEST_WIDTH, load_app_module, served

CHROMIUM = "/usr/bin/chromium"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
SCREENSHOTS = ROOT / "assets" / "screenshots"
TIMEOUT_MS = 60_000  # a busy 2-core machine; each action itself takes about a second

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium)"),
]


@pytest.fixture
def offline_app(offline_hub, monkeypatch):
    """The app as `python app.py` starts it offline: --weights imagenet cannot be had, so random weights and a banner."""
    def refuse(*args, **kwargs):  # torch.hub binds urlopen itself
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "urlopen", refuse, raising=False)
    return load_app_module().build_app("vgg16", "imagenet", TEST_WIDTH)


def visible(page, selector):
    return page.locator(f"{selector}:visible")


def test_every_tab_in_chromium(offline_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    requests = []
    shots = {}
    with served(offline_app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url)

            def screenshot(name):
                # Wait until no output shows a queue or processing status, then let plots fade in.
                expect(page.get_by_text(re.compile(r"^(queue: \d|processing)"))).to_have_count(0)
                page.wait_for_timeout(500)
                shots[name] = tmp_path / f"{name}.png"
                page.screenshot(path=shots[name], full_page=True)

            expect(page.locator("#untrained-banner")).to_contain_text("Untrained weights")
            expect(page.locator("#untrained-banner")).to_contain_text("--weights imagenet")

            # Receptive field: click a position near the top left of the picture.
            picture = visible(page, "#rf-picture img")
            expect(picture).to_be_visible()
            expect(visible(page, "#rf-effective img")).to_be_visible()
            expect(visible(page, "#rf-table")).to_contain_text("conv1_1")
            expect(page.get_by_text("unit (28, 28) of its 56 x 56 map")).to_be_visible()
            box = picture.bounding_box()
            picture.click(position={"x": box["width"] * 0.1, "y": box["height"] * 0.2})
            expect(page.get_by_text("unit (28, 28) of its 56 x 56 map")).to_have_count(0)
            summary = page.get_by_text("of its 56 x 56 map").inner_text()
            row, col = (int(v) for v in summary.split("unit (")[1].split(")")[0].split(", "))
            assert row < 28 and col < 28 and row > col, summary  # the click was up and to the left, more left
            screenshot("receptive_field")

            # 3x3 versus 7x7: measure both modules.
            page.get_by_role("tab", name="3x3 versus 7x7").click()
            expect(visible(page, "#st-costs")).to_contain_text("27C²")
            expect(visible(page, "#st-drawing img")).to_be_visible()
            visible(page, "#st-measure").click()
            expect(visible(page, "#st-measured")).to_contain_text("1 x conv7x7")
            screenshot("stacks")

            # Class score maps: upload a photograph.
            page.get_by_role("tab", name="Class score maps").click()
            expect(visible(page, "#sm-overlay img")).to_be_visible()
            page.locator("#sm-image input[type=file]").set_input_files(str(EXAMPLES / "coffee.jpg"))
            expect(visible(page, "#sm-sizes")).to_contain_text("576 x 384")  # coffee is 600 x 400, the cat 451 x 300
            expect(visible(page, "#sm-top5")).to_contain_text("probability")
            expect(visible(page, "#sm-overlay img")).to_be_visible()
            # A class by name: the box shows it back as "index: name".
            # A score-map pass still queued from the upload may land after the Enter and show its own top
            # class; the box then takes the name again (as a user would type it again).
            for attempt in range(3):
                visible(page, "#sm-class textarea").fill("tabby")
                visible(page, "#sm-class textarea").press("Enter")
                try:
                    expect(visible(page, "#sm-class textarea")).to_have_value("281: tabby", timeout=30_000)
                    break
                except AssertionError:
                    if attempt == 2:
                        raise
            screenshot("class_score_maps")
            # A text file named .jpg: vggkit's own message on the page, and the tab goes on working.
            notes = tmp_path / "notes.jpg"
            notes.write_text("a shopping list, not a picture")
            page.locator("#sm-image input[type=file]").set_input_files(str(notes))
            expect(page.get_by_test_id("toast-text").filter(has_text="notes.jpg: not an image PIL can read").first).to_be_visible()
            page.locator("#sm-image input[type=file]").set_input_files(str(EXAMPLES / "chelsea.jpg"))
            expect(visible(page, "#sm-sizes")).to_contain_text("577 x 384")  # the cat again, after the refusal

            # Feature maps: pick a layer.
            page.get_by_role("tab", name="Feature maps").click()
            expect(visible(page, "#fm-info")).to_contain_text("conv3_3")
            layer = visible(page, "#fm-layer input")
            layer.click()
            page.get_by_role("option", name="pool2", exact=True).click()
            expect(visible(page, "#fm-info")).to_contain_text("8 x 56 x 56")
            expect(visible(page, "#fm-grid img")).to_be_visible()
            screenshot("feature_maps")

            # Models: the paper's tables and the loaded weights.
            page.get_by_role("tab", name="Models").click()
            expect(visible(page, "#table1")).to_contain_text("conv3-256 x2, conv1-256, maxpool")
            expect(visible(page, "#table2")).to_contain_text("138,357,544")
            expect(visible(page, "#weights")).to_contain_text("random init")
            expect(visible(page, "#parameters img")).to_be_visible()
            screenshot("models")
        finally:
            browser.close()

    assert requests, "the page made no request at all"
    remote = [u for u in requests if not u.startswith(("data:", "blob:")) and urlparse(u).hostname not in LOCAL_HOSTS]
    assert not remote, f"requests left 127.0.0.1: {remote}"
    for path in shots.values():
        assert Image.open(path).size[0] == 1280
    if os.environ.get("VGGKIT_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name, path in shots.items():
            shrink_for_readme(path, SCREENSHOTS / f"{name}.png")


def shrink_for_readme(source: Path, target: Path, width: int = 960) -> None:
    """A screenshot at ``width`` px in a 256-colour palette: small enough to commit."""
    image = Image.open(source).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    tmp = target.with_suffix(".tmp.png")
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(tmp, optimize=True)
    shutil.move(tmp, target)
