"""Bad act input at the API never costs a 500: a visual prompt outside the image, an empty mask, a typed
`<region>` that marks nothing, a region without an image, or a model without a region encoder each get a
400 naming what is wrong; a request for a class the world lacks gets an answer. The `region` content part
(mmbridge's extension) reaches the model's region encoder."""

from __future__ import annotations

import httpx
import pytest

from mmbridge.generation import MMBridgePipeline
from mmbridge.heads_config import ActConfig
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.testing import png_data_url, running_server, shared_tiny_model_dir
from mmbridge.testing import build_tiny

MODEL = "tiny-act"
RED = png_data_url((220, 40, 40))


@pytest.fixture(scope="module")
def base_url():
    model, processor = build_tiny(seed=0, init_std=0.5)
    config = ActConfig(decoder_hidden_size=16, decoder_layers=1, decoder_heads=2, num_object_queries=4, mask_size=8)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    with running_server(create_app(MMBridgePipeline(model, processor), ServeSettings(model_name=MODEL))) as url:
        yield url


def ask(base_url, *content, model=MODEL, role="user", **extra):
    messages = [{"role": role, "content": list(content)}]
    if role != "user":
        messages.append({"role": "user", "content": "?"})
    body = {"model": model, "messages": messages, "max_tokens": 6, **extra}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)


def image():
    return {"type": "image_url", "image_url": {"url": RED}}


def text(value):
    return {"type": "text", "text": value}


BAD = {
    "box outside the image": ({"type": "region", "box": [0.5, 0.5, 1.5, 1.2]}, "outside the image"),
    "negative point": ({"type": "region", "point": [-0.1, 0.5]}, "fractions of the image"),
    "box upside down": ({"type": "region", "box": [0.8, 0.2, 0.3, 0.6]}, "x0 < x1"),
    "empty mask": ({"type": "region", "mask": [[0, 0], [0, 0]]}, "empty"),
    "mask not 2-D": ({"type": "region", "mask": [1, 0, 1]}, "2-D"),
    "numbers as strings": ({"type": "region", "box": ["0.1", "0.1", "0.5", "0.5"]}, "fractions"),
    "two kinds at once": ({"type": "region", "box": [0.1, 0.1, 0.5, 0.5], "point": [0.2, 0.2]}, "exactly one"),
    "no kind": ({"type": "region"}, "exactly one"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_visual_prompts_are_400_naming_the_part(base_url, case):
    region, words = BAD[case]
    response = ask(base_url, image(), text("What color is "), region, text("?"))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[2]" and error["code"] == "invalid_region"
    assert words in error["message"]
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_regions_that_mark_nothing_are_400(base_url):
    cases = [
        ((text("What color is <region>?"),), "placeholder"),  # typed, no region part (and no image)
        ((image(), text("What color is <region>?")), "placeholder"),
        ((text("What color is "), {"type": "region", "box": [0.1, 0.1, 0.5, 0.5]}), "image"),  # no image
        ((image(), {"type": "region", "box": [0.1, 0.1, 0.5, 0.5], "image": 3}), "image 3"),
        ((image(), {"type": "region", "mask": [[1] + [0] * 99] + [[0] * 100] * 99}), "no pixel"),  # vanishes at 32 px
    ]
    for content, words in cases:
        response = ask(base_url, *content)
        assert response.status_code == 400, (content, response.text)
        assert words in response.json()["error"]["message"], response.text
    response = ask(base_url, text("x"), role="assistant")  # fine: text in an assistant turn
    assert response.status_code == 200
    response = ask(base_url, {"type": "region", "box": [0.1, 0.1, 0.5, 0.5]}, role="assistant")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_region"


def test_a_good_region_is_read_and_unknown_classes_get_an_answer(base_url):
    for region in ({"box": [0.1, 0.1, 0.5, 0.5]}, {"point": [0.5, 0.5]}, {"scribble": [[0.1, 0.1], [0.9, 0.8]]},
                   {"mask": [[0, 1], [1, 1]]}):
        response = ask(base_url, image(), text("What color is "), {"type": "region", **region}, text("?"))
        assert response.status_code == 200, response.text
    for request in ("Find the hexagons.", "Segment every pink shape.", "Detect all cars."):
        response = ask(base_url, image(), text(request), output_parts=True)
        assert response.status_code == 200, response.text
        assert isinstance(response.json()["choices"][0]["message"]["content"], str)


def test_a_model_without_a_region_encoder_says_so():
    pipeline = MMBridgePipeline.from_pretrained(shared_tiny_model_dir())
    with running_server(create_app(pipeline, ServeSettings(model_name="tiny"))) as url:
        response = ask(url, image(), text("What color is "), {"type": "region", "box": [0.1, 0.1, 0.5, 0.5]},
                       model="tiny")
        assert response.status_code == 400
        assert "reads none" in response.json()["error"]["message"]


def test_an_assistant_turn_sent_back_with_its_parts_keeps_its_route(base_url):
    """A client that sends back `message.parts` (what `output_parts` returned) gets the history the model wrote —
    `[DET]` and its 4 super-link queries — not an empty turn; a part no head of this model makes is a 400."""
    def prompt_tokens(assistant):
        messages = [{"role": "user", "content": [image(), text("Find every circle.")]}, assistant,
                    {"role": "user", "content": "And the squares?"}]
        response = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                              json={"model": MODEL, "messages": messages, "max_tokens": 2})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    found = {"type": "detections", "route": "[DET]", "boxes": [[0.1, 0.1, 0.4, 0.4]], "scores": [0.9]}
    bare = prompt_tokens({"role": "assistant", "content": ""})
    assert prompt_tokens({"role": "assistant", "content": "", "parts": [found]}) == bare + 1 + 4
    said = prompt_tokens({"role": "assistant", "content": "", "parts": [text("Here:"), found]})
    assert said > bare + 5
    for bad in ({**found, "route": "[FLY]"}, {"type": "weather"}, "[DET]"):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "parts": [bad]},
                    {"role": "user", "content": "?"}]
        response = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                              json={"model": MODEL, "messages": messages, "max_tokens": 2})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_parts", response.text
