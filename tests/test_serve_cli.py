"""`mmbridge serve` / `mmbridge ui` command line: registration, user errors, a real server process."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from mmbridge.cli import build_parser, main
from mmbridge.serve.testing import shared_tiny_model_dir


def test_commands_are_registered():
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--ui", "--api-key", "k", "--port", "9"])
    assert args.command == "serve" and args.ui and args.api_key == "k" and args.host == "127.0.0.1"
    assert parser.parse_args(["ui", "--model", "m"]).port == 7860


@pytest.mark.parametrize("argv", [["serve", "--model", "/nonexistent/model"], ["ui", "--model", "/nonexistent/model"],
                                  ["serve", "--model", ".", "--max-batch-size", "0"]])
def test_user_errors_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmbridge {argv[0]}: error:") and "Traceback" not in err


def test_serve_command_builds_a_server_that_loads_in_the_background(monkeypatch):
    """Runs the real `serve` handler; only `uvicorn.run` is swapped for the test server thread."""
    import uvicorn

    from mmbridge.serve.testing import running_server

    def run_in_thread(app, host, port, log_level, **kwargs):
        assert (host, port) == ("127.0.0.1", 8123)
        with running_server(app) as url:
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/health/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3)
            assert reply.usage.completion_tokens <= 3
            assert httpx.get(f"{url}/v1/models").status_code == 401  # key from $MMBRIDGE_API_KEY
            calls.append(url)

    calls = []
    monkeypatch.setattr(uvicorn, "run", run_in_thread)
    monkeypatch.setenv("MMBRIDGE_API_KEY", "k")
    assert main(["serve", "--model", shared_tiny_model_dir(), "--port", "8123", "--served-model-name", "tiny"]) == 0
    assert calls
