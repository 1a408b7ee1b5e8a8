"""The web page at / in headless Chromium: generate, pick a word, click a point to place the object
there, resize it with the slider. Writes outputs/serve/page_*.png screenshots.

Slow (a browser start); skipped unless Debian's chromium (`apt-get install -y chromium`) and Playwright
for Python are installed. Traffic: loopback only."""

import json
import os
import shutil
import threading
import time

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
OUT = os.path.join("outputs", "serve")
WAIT = 120


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from sgfast import SelfGuidancePipeline
    from sgfast.serve.admission import Limits
    from sgfast.serve.app import create_app
    from sgfast.serve.cost import CostModel
    from sgfast.serve.engine import Engine
    from sgfast.shapes import load_pipeline

    pipe, name = load_pipeline("default")  # the built-in model when installed (real shapes), else the tiny one
    pipe.set_progress_bar_config(disable=True)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    engine = Engine(sg, model=name, cost=CostModel.fixed(20, 50, 10), limits=Limits(default_steps=10), threads=1)
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(WAIT)


@pytest.fixture(scope="module")
def page():
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"), args=ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 620})
        yield page
        browser.close()


def wait_for_answer(page, previous):
    page.wait_for_function(
        "prev => { const s = document.getElementById('status').textContent; return s !== prev && !s.startsWith('working'); }",
        arg=previous,
        timeout=WAIT * 1000,
    )
    return page.text_content("#status")


def edits_of(page):
    return json.loads(page.get_attribute("#status", "data-edits"))


def test_generate_place_and_resize_in_the_browser(server, page):
    url, engine = server
    os.makedirs(OUT, exist_ok=True)
    page.goto(url + "/")
    assert "sgfast" in page.title()
    page.fill("#prompt", "a red circle and a blue square")
    page.fill("#steps", "10")
    page.click("#generate")
    status = wait_for_answer(page, "-")
    assert "steps 10" in status and "edits: none" in status, status
    assert page.get_attribute("#image", "src").startswith("data:image/png;base64,")
    words = page.eval_on_selector_all("#words button", "bs => bs.map(b => b.textContent)")
    assert words == ["red", "circle", "blue", "square"]
    page.screenshot(path=os.path.join(OUT, "page_generated.png"))

    # Pick "circle", then click three quarters across, a quarter down: a place edit to (0.75, 0.25).
    page.click("#words button[data-word=circle]")
    box = page.locator("#canvas").bounding_box()
    page.mouse.click(box["x"] + 0.75 * box["width"], box["y"] + 0.25 * box["height"])
    status = wait_for_answer(page, status)
    (place,) = edits_of(page)
    assert "place circle at (0.75, 0.25)" in status
    assert place["type"] == "place" and place["word"] == "circle", status
    assert place["x"] == pytest.approx(0.75, abs=0.01) and place["y"] == pytest.approx(0.25, abs=0.01)  # border pixels
    assert "cache hit: true" in status  # the generation's trace was reused
    page.screenshot(path=os.path.join(OUT, "page_placed.png"))

    # The size slider: 2^1 = twice the area.
    page.eval_on_selector("#size", "el => { el.value = '1'; el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); }")
    status = wait_for_answer(page, status)
    place, resize = edits_of(page)
    assert "resize circle x2.00" in status  # the earlier placement is kept
    assert place["type"] == "place" and resize == {"type": "resize", "word": "circle", "scale": 2.0, "keep_others": True}
    assert page.text_content("#sizeLabel") == "x2.00"
    page.screenshot(path=os.path.join(OUT, "page_resized.png"))

    # An error is shown, not swallowed.
    page.fill("#steps", "1000")
    page.click("#generate")
    status = wait_for_answer(page, status)
    assert "HTTP 422" in status and "cap" in status
    assert engine.alive
