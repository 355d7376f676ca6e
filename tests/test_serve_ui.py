"""The web UI in headless Chromium (Playwright): upload an image, ask, see the streamed answer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs /usr/bin/chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def ui_server(gradio_env):
    from mmbridge.generation import MMBridgePipeline
    from mmbridge.serve.app import ServeSettings, create_app
    from mmbridge.serve.testing import running_server, shared_tiny_model_dir

    pipeline = MMBridgePipeline.from_pretrained(shared_tiny_model_dir())
    with running_server(create_app(pipeline, ServeSettings(model_name="tiny", ui=True))) as url:
        yield url, pipeline


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def test_upload_ask_and_see_the_answer(ui_server, browser, gradio_env, tmp_path):
    from PIL import Image

    from mmbridge.generation import SamplingOptions

    url, pipeline = ui_server
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (50, 90, 230)).save(image_path)
    question = "What color is the square?"
    expected = pipeline.generate([{"role": "user", "content": [
        {"type": "image", "image": Image.open(image_path)}, {"type": "text", "text": question}]}],
        options=SamplingOptions(max_new_tokens=64))[0].text

    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(f"{url}/ui/", wait_until="domcontentloaded")
    page.wait_for_selector("#mmb-input textarea", timeout=30_000)
    page.set_input_files("#mmb-image input[type=file]", str(image_path))
    page.wait_for_selector("#mmb-image img", timeout=15_000)  # the preview is shown
    page.fill("#mmb-input textarea", question)
    page.click("#mmb-send")
    bot = page.locator("#mmb-chat [data-testid='bot']").last
    bot.wait_for(timeout=30_000)
    page.wait_for_function(
        "() => { const m = document.querySelectorAll(\"#mmb-chat [data-testid='bot']\");"
        " return m.length && m[m.length - 1].innerText.trim().length > 0; }", timeout=30_000)
    page.wait_for_timeout(500)  # let the stream settle
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_ui_chat.png"), full_page=True)
    shown = bot.inner_text()
    user = page.locator("#mmb-chat [data-testid='user']").last.inner_text()
    page.close()

    assert question in user
    squash = lambda s: re.sub(r"[^A-Za-z0-9]", "", s)  # noqa: E731  markdown may restyle symbols
    assert squash(shown) and squash(shown) == squash(expected)
    # The upload was read into memory and deleted: no image left in Gradio's upload folder.
    leftovers = [p for p in gradio_env.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".webp")]
    assert leftovers == []
