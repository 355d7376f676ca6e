"""The web UI under the API's rules, through Gradio's own HTTP API (`gradio_client`, no browser needed):
one image guard before any decode, an upload size cap, temp files deleted on every path (other image
modes too), image URLs never fetched, and a login page that says what the password is."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest

gr = pytest.importorskip("gradio")

KEY = "sekret"


def png_bytes(size, mode="RGB", color=0) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ui(gradio_env):
    from gradio_client import Client

    from mmbridge.generation import MMBridgePipeline
    from mmbridge.serve.app import ServeSettings, create_app
    from mmbridge.serve.testing import running_server, shared_tiny_model_dir

    pipeline = MMBridgePipeline.from_pretrained(shared_tiny_model_dir())
    settings = ServeSettings(model_name="tiny", ui=True, api_key=KEY, max_image_bytes=300_000,
                             max_image_pixels=2048 * 2048)
    with running_server(create_app(pipeline, settings)) as url:
        client = Client(f"{url}/ui/", auth=("anyone", KEY), verbose=False, download_files=False)
        yield url, client


def leftovers(directory):
    return [p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".webp")]


def ask(client, path_or_url, question="What is it?"):
    from gradio_client import handle_file

    return client.predict(question, handle_file(str(path_or_url)), [], 4, 0, 1, None, api_name="/submit")


def test_login_page_says_the_password_is_the_api_key(ui):
    url, _ = ui
    response = httpx.get(f"{url}/ui/config")
    assert response.status_code == 401
    assert "API key" in response.json()["detail"]["auth_message"]


def test_a_grey_image_in_another_mode_is_answered_and_deleted(ui, gradio_env, tmp_path):
    _, client = ui
    image = tmp_path / "grey.png"
    image.write_bytes(png_bytes((64, 64), "L", 128))
    chat = ask(client, image)[0]
    assert chat[-1]["role"] == "assistant" and chat[0]["content"][0]["text"].startswith("[image]")
    assert leftovers(gradio_env) == []  # no converted copy, no original left behind


def test_a_12000px_grey_png_is_refused_before_any_decode_and_deleted(ui, gradio_env, tmp_path):
    _, client = ui
    image = tmp_path / "huge.png"
    image.write_bytes(png_bytes((12000, 12000), "L"))
    assert image.stat().st_size < 300_000
    with pytest.raises(Exception, match="over the limit"):
        ask(client, image)
    assert leftovers(gradio_env) == []


def test_uploads_over_the_image_size_cap_are_refused_by_gradio(ui):
    url, _ = ui
    with httpx.Client(base_url=url) as c:
        assert c.post("/ui/login", data={"username": "u", "password": KEY}).status_code == 200
        big = c.post("/ui/gradio_api/upload", files={"files": ("big.png", b"\x89PNG" + b"0" * 400_000)})
        assert big.status_code == 413


def test_image_urls_are_not_fetched(ui, gradio_env, monkeypatch):
    from gradio import processing_utils

    fetched = []

    async def no_download(url, cache_dir):
        fetched.append(url)
        raise AssertionError("the UI fetched a URL")

    monkeypatch.setattr(processing_utils, "async_ssrf_protected_download", no_download)
    _, client = ui
    with pytest.raises(Exception, match="not fetched"):
        ask(client, "https://example.com/cat.png")
    assert fetched == []


def test_read_upload_checks_the_header_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from mmbridge.serve.images import ImagePolicy
    from mmbridge.serve.ui import read_upload

    def no_decode(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes((12000, 12000), "L"))
    with pytest.raises(gr.Error, match="over the limit"):
        read_upload(str(path), ImagePolicy(max_pixels=4096 * 4096))
    assert not path.exists()


def test_guarded_image_refuses_urls_and_passes_the_upload_path_through(tmp_path):
    from gradio.data_classes import ImageData

    from mmbridge.serve.ui import guarded_image

    component = guarded_image()
    with pytest.raises(gr.Error, match="not fetched"):
        asyncio.run(component.async_move_resource_to_block_cache("http://169.254.169.254/latest"))
    path = tmp_path / "grey.png"
    path.write_bytes(png_bytes((32, 32), "L"))
    assert component.preprocess(ImageData(path=str(path), orig_name="grey.png")) == str(path)
