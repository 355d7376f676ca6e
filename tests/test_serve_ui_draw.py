"""The web UI shows a drawn image inline, in headless Chromium (Playwright): ask the tiny draw model to
draw, see the image in the chat (screenshot in tests/artifacts/serve_ui_draw.png)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs /usr/bin/chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def ui_server(gradio_env, tmp_path_factory):
    from mmbridge.generation import MMBridgePipeline
    from mmbridge.serve.app import ServeSettings, create_app
    from mmbridge.serve.testing import running_server, tiny_draw_model_dir

    pipeline = MMBridgePipeline.from_pretrained(tiny_draw_model_dir(tmp_path_factory.mktemp("tiny-draw")))
    with running_server(create_app(pipeline, ServeSettings(model_name="draw", ui=True))) as url:
        yield url, pipeline


def test_the_drawn_image_is_shown_in_the_chat(ui_server):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from mmbridge.generation import ImagePart
    from mmbridge.serve.testing import DRAW_PROMPT

    url, pipeline = ui_server
    # what the UI asks for by default (greedy, 64 new tokens); the chat shows the answer's last drawing last
    [result] = pipeline.generate([{"role": "user", "content": DRAW_PROMPT}], max_new_tokens=64)
    expected = [p.image for p in result.parts if isinstance(p, ImagePart)][-1]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(f"{url}/ui/", wait_until="domcontentloaded")
            page.wait_for_selector("#mmb-input textarea", timeout=30_000)
            page.fill("#mmb-input textarea", DRAW_PROMPT)
            page.click("#mmb-send")
            image = page.locator("#mmb-chat [data-testid='bot'] img").last
            image.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => { const i = document.querySelectorAll(\"#mmb-chat [data-testid='bot'] img\");"
                " return i.length && i[i.length - 1].complete && i[i.length - 1].naturalWidth > 0; }",
                timeout=30_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve_ui_draw.png"), full_page=True)
            assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == list(expected.size)
            box = image.bounding_box()
            assert box["width"] >= 200 and box["height"] >= 200  # a 16 px drawing is shown scaled up
            # the bytes the browser shows are the image the model drew
            data = page.evaluate("""async src => {
                const b = new Uint8Array(await (await fetch(src)).arrayBuffer());
                let s = ""; for (const x of b) s += String.fromCharCode(x); return btoa(s); }""",
                                 image.get_attribute("src"))
            shown = Image.open(io.BytesIO(base64.b64decode(data)))
            assert shown.format == "PNG" and shown.convert("RGB").tobytes() == expected.convert("RGB").tobytes()
        finally:
            browser.close()
