"""API key (401) and remote image fetching rules (allowlist, private addresses on every redirect
hop, byte cap, timeout), against real servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import io
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from mmbridge.generation import MMBridgePipeline
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.images import ImageInputError, RemoteFetcher, address_is_public
from mmbridge.serve.testing import running_server, shared_tiny_model_dir

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def pipeline():
    return MMBridgePipeline.from_pretrained(shared_tiny_model_dir())


@pytest.fixture(scope="module")
def keyed_url(pipeline):
    with running_server(create_app(pipeline, ServeSettings(model_name="tiny", api_key=KEY))) as url:
        yield url


BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_bearer_is_401(keyed_url, headers):
    response = httpx.post(f"{keyed_url}/v1/chat/completions", json=BODY, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{keyed_url}/v1/models", headers=headers).status_code == 401


def test_auth_is_checked_before_the_body_is_parsed(keyed_url):
    response = httpx.post(f"{keyed_url}/v1/chat/completions", content=b"{broken",
                          headers={"content-type": "application/json"})
    assert response.status_code == 401


def test_right_key_works_and_health_stays_open(keyed_url):
    good = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(**BODY).usage.completion_tokens <= 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{keyed_url}/health").status_code == 200
    assert httpx.get(f"{keyed_url}/health/ready").status_code == 200


# -- remote image fetching --------------------------------------------------------------------------

def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (50, 180, 70)).save(buffer, "PNG")
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        status, headers, body, delay = self.routes.get(self.path, (404, {}, b"", 0))
        time.sleep(delay)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    """A plain HTTP server on 127.0.0.1 standing in for a public image host."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    _Handler.routes = {
        "/img.png": (200, {"Content-Type": "image/png"}, _png(), 0),
        "/big": (200, {}, b"\0" * 200_000, 0),
        "/slow": (200, {}, _png(), 2.0),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"", 0),
        "/to-internal": (302, {"Location": f"http://internal.test:{port}/img.png"}, b"", 0),
        "/to-elsewhere": (302, {"Location": f"http://evil.test:{port}/img.png"}, b"", 0),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b"", 0),
        "/to-img": (302, {"Location": "/img.png"}, b"", 0),
        "/loop": (302, {"Location": "/loop"}, b"", 0),
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port
    server.shutdown()


def fake_dns(host, port):
    """cdn.test is 'public' (really 127.0.0.1); internal.test resolves to a private address."""
    return {"cdn.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"], "internal.test": ["10.0.0.7"],
            "169.254.169.254": ["169.254.169.254"], "localhost": ["127.0.0.1"]}[host]


def fetcher(**kwargs):
    # Treat only 127.0.0.1 as "public" so the local origin can play the internet; every other
    # address goes through the real policy.
    policy = lambda a: a == "127.0.0.1" or address_is_public(a)  # noqa: E731
    return RemoteFetcher(allowed_hosts=["cdn.test", "internal.test", "169.254.169.254", "localhost"],
                         max_bytes=100_000, timeout=1.0, resolve=fake_dns, address_ok=policy, **kwargs)


def test_allowlisted_public_host_is_fetched(origin):
    assert fetcher().fetch(f"http://cdn.test:{origin}/img.png") == _png()
    assert fetcher().fetch(f"http://cdn.test:{origin}/to-img") == _png()  # a clean redirect is followed


@pytest.mark.parametrize("path,reason", [
    ("/to-metadata", "private or reserved"),   # link-local on the second hop
    ("/to-internal", "private or reserved"),   # allowlisted name, private address, second hop
    ("/to-elsewhere", "not in the allowlist"),
    ("/to-file", "scheme"),
    ("/loop", "too many redirects"),
    ("/big", "larger than the limit"),
    ("/slow", "failed"),  # read timeout
])
def test_every_hop_is_checked_and_limits_hold(origin, path, reason):
    with pytest.raises(ImageInputError, match=reason):
        fetcher().fetch(f"http://cdn.test:{origin}{path}")


def test_hosts_outside_the_allowlist_and_real_loopback_are_refused(origin):
    real_policy = RemoteFetcher(allowed_hosts=["localhost"], resolve=fake_dns)
    with pytest.raises(ImageInputError, match="private or reserved"):
        real_policy.fetch(f"http://localhost:{origin}/img.png")
    with pytest.raises(ImageInputError, match="not in the allowlist"):
        fetcher().fetch(f"http://example.org:{origin}/img.png")


@pytest.mark.parametrize("address,public", [("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False),
                                            ("192.168.0.1", False), ("169.254.169.254", False),
                                            ("100.64.0.1", False), ("::1", False), ("fe80::1", False),
                                            ("::ffff:127.0.0.1", False), ("0.0.0.0", False),
                                            ("2606:4700::1111", True)])
def test_address_policy(address, public):
    assert address_is_public(address) is public


def test_server_fetches_only_when_enabled(pipeline, origin):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"http://cdn.test:{origin}/img.png"}},
        {"type": "text", "text": "color?"}]}]}
    with running_server(create_app(pipeline, ServeSettings(model_name="tiny", image_fetcher=fetcher()))) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200
        body["messages"][0]["content"][0]["image_url"]["url"] = f"http://cdn.test:{origin}/to-metadata"
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_image"
        body["messages"][0]["content"][0]["image_url"]["url"] = "file:///etc/hostname"
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 400
