"""Drawn images everywhere a user meets them (issue 14 items 5 and 6): chat completions (`message.images`,
content parts, streaming), the OpenAI Images API, the web UI, `mmbridge eval draw` and `mmbridge demo`,
on a tiny draw model trained a few steps to write `[IMG0]` for "Draw a red square." (numbers
meaningless, mechanics real); the eval's reader path on rendered scenes standing in for drawings."""

from __future__ import annotations

import base64
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from mmbridge.generation import ImagePart, MMBridgePipeline
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.testing import DRAW_PROMPT as PROMPT
from mmbridge.serve.testing import running_server, shared_tiny_model_dir, tiny_draw_model_dir


@pytest.fixture(scope="module")
def draw_model_dir(tmp_path_factory):
    """A tiny model with a draw head whose mapper (and [IMG0] row) learned one drawing (as test_draw_head)."""
    return tiny_draw_model_dir(tmp_path_factory.mktemp("tiny-draw"))


@pytest.fixture(scope="module")
def pipeline(draw_model_dir):
    return MMBridgePipeline.from_pretrained(draw_model_dir)


@pytest.fixture(scope="module")
def expected(pipeline):
    [result] = pipeline.generate([{"role": "user", "content": PROMPT}], max_new_tokens=12)
    images = [p.image for p in result.parts if isinstance(p, ImagePart)]
    assert images, f"the fixture model should draw: {result.raw_text!r}"
    return result, images[0]


@pytest.fixture(scope="module")
def base_url(pipeline):
    with running_server(create_app(pipeline, ServeSettings(model_name="draw"))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def decode_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def same_image(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


# -- chat completions ------------------------------------------------------------------------------

def test_chat_completion_returns_the_drawn_image_to_the_openai_client(client, expected):
    result, image = expected
    reply = client.chat.completions.create(model="draw", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=12)
    message = reply.choices[0].message
    assert message.content == result.text  # the text, as every OpenAI client reads it
    [drawn] = message.images
    assert drawn["type"] == "image_url" and same_image(decode_url(drawn["image_url"]["url"]), image)


def test_content_parts_and_typed_parts_on_request(base_url, expected):
    _, image = expected
    body = {"model": "draw", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12,
            "content_parts": True, "output_parts": True}
    message = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
    images = [p for p in message["content"] if p["type"] == "image_url"]
    assert len(images) == 1 and same_image(decode_url(images[0]["image_url"]["url"]), image)
    assert all(p["type"] in ("text", "image_url") for p in message["content"])
    [typed] = [p for p in message["parts"] if p["type"] == "image"]
    assert typed["head"] == "draw" and (typed["width"], typed["height"]) == image.size


def test_streaming_sends_the_images_in_the_final_chunk(client, expected):
    result, image = expected
    chunks = list(client.chat.completions.create(model="draw", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == result.text
    with_images = [c for c in chunks if c.choices and getattr(c.choices[0].delta, "images", None)]
    assert len(with_images) == 1 and with_images[0].choices[0].finish_reason is not None
    assert same_image(decode_url(with_images[0].choices[0].delta.images[0]["image_url"]["url"]), image)


# -- Images API ------------------------------------------------------------------------------------

def test_images_generate_with_the_openai_client(client, expected):
    _, image = expected
    response = client.images.generate(model="draw", prompt="a red square", size="16x16", response_format="b64_json")
    [data] = response.data
    assert data.revised_prompt == PROMPT  # asked as the draw data phrases it
    assert same_image(Image.open(io.BytesIO(base64.b64decode(data.b64_json))), image)
    # defaults (no size, no response_format) are fine too
    assert client.images.generate(model="draw", prompt=PROMPT).data[0].b64_json == data.b64_json


@pytest.mark.parametrize("overrides, param", [
    ({"n": 2}, "n"), ({"size": "1024x1024"}, "size"), ({"response_format": "url"}, "response_format"),
    ({"model": "other"}, "model"), ({"n": "1"}, "n"), ({"prompt": ""}, "prompt"), ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
])
def test_images_bad_requests_are_clear_400s(base_url, overrides, param):
    body = {"model": "draw", "prompt": PROMPT, **overrides}
    if overrides.get("prompt") == "\ud800":
        response = httpx.post(f"{base_url}/v1/images/generations", timeout=60,
                              content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    else:
        response = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=60)
    status = 404 if param == "model" else 400
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_images_bad_requests_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="one image per request"):
        client.images.generate(model="draw", prompt=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError, match="16x16"):
        client.images.generate(model="draw", prompt=PROMPT, size="1024x1024")


def test_what_the_world_lacks_gets_an_answer_never_a_crash(base_url):
    for prompt in ("a green hexagon", "Draw a purple elephant riding a bicycle.", "hello"):
        response = httpx.post(f"{base_url}/v1/images/generations", json={"prompt": prompt}, timeout=60)
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400:
            error = response.json()["error"]
            assert error["code"] == "image_not_drawn" and "without drawing" in error["message"]
        else:
            assert Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).size == (16, 16)
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_a_model_without_a_draw_head_says_so():
    plain = MMBridgePipeline.from_pretrained(shared_tiny_model_dir())
    with running_server(create_app(plain, ServeSettings(model_name="tiny"))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="no draw head") as err:
            client.images.generate(model="tiny", prompt=PROMPT)
        assert err.value.body["code"] == "model_cannot_draw"
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert isinstance(reply.choices[0].message.content, str)
        assert getattr(reply.choices[0].message, "images", None) is None  # absent when nothing was drawn


# -- web UI ----------------------------------------------------------------------------------------

def test_the_ui_shows_the_drawn_image_inline(pipeline, expected, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from gradio_client import Client

    _, image = expected
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with running_server(create_app(pipeline, ServeSettings(model_name="draw", ui=True))) as url:
        ui = Client(f"{url}/ui/", verbose=False, download_files=False)
        chat = ui.predict(PROMPT, None, [], 12, 0, 1, None, api_name="/submit")[0]
        assert chat[0]["role"] == "user" and chat[0]["content"][0]["text"] == PROMPT
        shown = [c for m in chat if m["role"] == "assistant" for c in m["content"] if c.get("type") == "component"]
        assert len(shown) == 1 and shown[0]["component"] == "image"
        value = shown[0]["value"]
        served = httpx.get(value["url"], timeout=30)
        assert served.status_code == 200 and same_image(Image.open(io.BytesIO(served.content)), image)
        assert value["path"].endswith(".png")  # lossless, not Gradio's default WEBP
        assert str(tmp_path / "gradio") in value["path"]  # in Gradio's cache folder (swept), never ours


# -- eval draw -------------------------------------------------------------------------------------

def test_frechet_distance_of_gaussians():
    from mmbridge.evaluate import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + [3, 0, 0, 0]) == pytest.approx(9, abs=1e-6)
    assert frechet_distance(a, 2 * a) == pytest.approx(4, rel=0.15)  # Tr(Σ + 4Σ - 2·2Σ) = Tr Σ ≈ 4
    assert frechet_distance(a[:1], a[:1]) == 0  # one sample each: no covariance, no crash


def test_the_reader_path_scores_rendered_scenes_fully_faithful(tmp_path):
    """Rendered world scenes standing in for drawings: every request read back as asked (100 %)."""
    from mmbridge.data.shapes.faithfulness import as_request
    from mmbridge.evaluate import evaluate_draw, read_draw_requests, render_request

    lines = ["Draw a large red circle above a small blue square.",
             "Draw a small green triangle to the left of a large yellow diamond.",
             "Paint a large cyan cross.",
             json.dumps({"prompt": "Show me three shapes.", "objects": ["small white circle", "large orange square",
                                                                          "small purple triangle"]}),
             json.dumps({"objects": ["large blue cross", "small red diamond"],
                         "relation": {"a": 1, "rel": "below", "b": 0}}),
             json.dumps({"objects": [{"size": "small", "color": "green", "shape": "circle"},
                                     "small red square", "large yellow triangle", "small blue diamond"]}),
             "Draw a green hexagon."]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    requests = read_draw_requests(prompts)
    assert requests[4]["prompt"] == "Draw a small red diamond below a large blue cross."
    assert not requests[6]["request"].objects  # the world has no hexagon
    by_prompt = {r["prompt"]: r["request"] for r in requests}

    def render(prompt_batch):
        return [(render_request(as_request(by_prompt[p]), seed=1000 + i), "") for i, p in enumerate(prompt_batch)]

    summary, records = evaluate_draw(render, requests, tmp_path / "out", batch_size=3, progress=False)
    assert summary["faithful"] == 1.0 and summary["readable"] == 1.0 and summary["strict"] == 1.0
    assert summary["per_attribute"]["relation"] == 1.0 and summary["per_attribute"]["relation_n"] == 3
    assert summary["drawn"] == 6 and summary["not_in_world"] == 1 and summary["no_image"] == 0
    assert records[6]["status"] == "not_in_world"
    assert all(os.path.isfile(r["image"]) for r in records[:6])


def test_eval_draw_cli_on_the_tiny_draw_model(draw_model_dir, tmp_path, capsys):
    from mmbridge.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([json.dumps({"prompt": PROMPT, "objects": ["large red square"]}),
                                  "Draw a small blue circle above a large green cross.",
                                  "a green hexagon"]) + "\n")
    out = tmp_path / "draw"
    assert main(["eval", "draw", "--model", str(draw_model_dir), "--prompts", str(prompts), "--out", str(out),
                 "--guidance-scale", "3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["guidance_scale"] == 3.0 and summary["num_vokens"] == 8
    assert summary["prompts"] == 3 and summary["not_in_world"] == 1 and summary["drawn"] >= 1
    assert 0 <= summary["faithful"] <= 1 and 0 <= summary["readable"] <= 1
    assert set(summary["per_attribute"]) >= {"count", "shape", "color", "size", "relation", "f1"}
    assert summary["frechet_distance"] >= 0
    records = [json.loads(line) for line in (out / "draw.jsonl").read_text().splitlines()]
    assert records[0]["status"] == "drawn" and Image.open(records[0]["image"]).size == (16, 16)
    assert records[2]["status"] == "not_in_world"


def test_eval_draw_of_the_generator_alone_is_the_upper_bound_row(draw_model_dir, tmp_path, capsys):
    """`--generator DIR`: the frozen SD-layout generator prompted with each request's caption text, scored
    like a model; `--model` only lends its vision encoder to the Fréchet distance."""
    from mmbridge.cli import main
    from mmbridge.config import MMBridgeConfig

    generator = MMBridgeConfig.from_pretrained(draw_model_dir).component_paths["draw.generator"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("Draw a small blue circle above a large green cross.\nDraw a large red square.\n")
    out = tmp_path / "gen"
    assert main(["eval", "draw", "--model", str(draw_model_dir), "--generator", str(generator), "--prompts",
                 str(prompts), "--out", str(out), "--steps", "2", "--guidance-scale", "1", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["generator"] == str(generator) and summary["steps"] == 2 and "num_vokens" not in summary
    assert summary["drawn"] == 2 and summary["frechet_distance"] >= 0
    records = [json.loads(line) for line in (out / "draw.jsonl").read_text().splitlines()]
    assert records[0]["text"] == "a small blue circle above a large green cross"  # what the generator was given
    assert main(["eval", "draw", "--generator", str(tmp_path), "--prompts", str(prompts)]) == 2
    assert "not a diffusers pipeline directory" in capsys.readouterr().err
    # without the Fréchet distance no model is loaded at all (a --model that does not exist is never read)
    assert main(["eval", "draw", "--model", str(tmp_path / "absent"), "--generator", str(generator), "--prompts",
                 str(prompts), "--out", str(tmp_path / "gen2"), "--steps", "1", "--no-fid", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["drawn"] == 2


def test_eval_story_draws_each_sentence_and_scores_steps(draw_model_dir, tmp_path, capsys):
    """`mmbridge eval story`: each story sentence is a user turn of one chat; every step is drawn, saved, read
    back and scored (faithful to its scene; consistent with the previous drawing under the narrated edit)."""
    from mmbridge.cli import main

    out = tmp_path / "story"
    assert main(["eval", "story", "--model", str(draw_model_dir), "--stories", "2", "--out", str(out),
                 "--steps", "2", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stories"] == 2 and summary["steps"] == 6 and summary["drawn"] == 6
    assert 0 <= summary["good"] <= summary["faithful"] <= 1 and len(summary["good_by_step"]) == 3
    records = [json.loads(line) for line in (out / "story.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 0, 1, 2]
    assert records[0]["prompt"].startswith("At first") and records[1]["prompt"].startswith("Then ")
    assert "consistent" not in records[0] and isinstance(records[1]["consistent"], bool)
    assert all(os.path.isfile(r["image"]) for r in records)
    assert main(["eval", "story", "--model", shared_tiny_model_dir(), "--stories", "1"]) == 2
    assert "no draw head" in capsys.readouterr().err


def test_eval_draw_cli_errors_are_one_line(tmp_path, capsys):
    from mmbridge.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    assert main(["eval", "draw", "--model", shared_tiny_model_dir(), "--prompts", str(prompts),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no draw head" in err and len(err.splitlines()) == 1
    assert main(["eval", "draw", "--model", shared_tiny_model_dir(), "--prompts", str(tmp_path / "none")]) == 2
    assert "needs --prompts" in capsys.readouterr().err


# -- demo ------------------------------------------------------------------------------------------

def test_demo_draws_saves_and_marks_with_the_reader(draw_model_dir, tmp_path, capsys, monkeypatch):
    from mmbridge.cli import main
    from mmbridge.commands import demo

    monkeypatch.setattr(demo, "DRAW_PROMPTS", (PROMPT, "Draw a large red square."))
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(draw_model_dir), "--max-new-tokens", "12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"== drawing (images and chat.md under {out})" in printed
    paths = [line.split("image: ", 1)[1].split()[0] for line in printed.splitlines() if "image: " in line]
    assert paths and all(os.path.isfile(p) for p in paths)
    assert all(("[right" in line or "[wrong" in line) for line in printed.splitlines() if "image: " in line)
    assert "drawings right (read back by the world reader)" in printed
    page = (out / "chat.md").read_text()
    assert PROMPT in page and os.path.basename(paths[0]) in page
