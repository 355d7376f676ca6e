"""`mmbridge serve` (OpenAI-compatible API, optional UI at /ui) and `mmbridge ui` (web UI only).

Heavy imports (torch, fastapi, gradio) stay inside the handlers so `mmbridge --help` is instant.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                                  description="Serve a model over an OpenAI-compatible API "
                                              "(/v1/chat/completions, /v1/models, /health, /health/ready).")
    _common(serve, default_port=8000)
    serve.add_argument("--ui", action="store_true", help="also serve the web UI at /ui")
    serve.add_argument("--served-model-name", help="model id clients send (default: the model's name)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="rows per shared forward pass (1 = no batching)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to gather a batch")
    serve.add_argument("--max-queue", type=int, default=32, help="waiting requests before 429")
    serve.add_argument("--max-images", type=int, default=8, help="images per request")
    serve.add_argument("--max-n", type=int, default=4, help="choices (n) per request")
    serve.add_argument("--default-max-tokens", type=int, default=256)
    serve.add_argument("--max-input-tokens", type=int, default=None,
                       help="prompt tokens per request (default: up to the model's context); bigger prompts are "
                            "refused, most without being tokenized")
    serve.add_argument("--max-stop-chars", type=int, default=128, help="characters per stop string")
    serve.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                       help="seconds to receive a request body (408 after)")
    serve.add_argument("--queue-timeout", type=float, default=120.0, metavar="S",
                       help="seconds a request may wait for its batch (503 + Retry-After after)")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                       help="seconds running requests get to finish on SIGTERM/Ctrl-C")
    serve.add_argument("--max-request-image-pixels", type=int, default=4096 * 4096,
                       help="pixels of all a request's images together, read from their headers before decoding")
    serve.add_argument("--allow-remote-images", metavar="HOST", action="append", default=[],
                       help="allow http(s) image URLs from HOST (repeatable; '*.example.com' for subdomains); "
                            "private/loopback addresses stay blocked")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)

    ui = subparsers.add_parser("ui", help="chat with the model in a web UI (Gradio)",
                               description="A local web UI: image upload, streamed answers, sampling controls.")
    _common(ui, default_port=7860)
    ui.set_defaults(func=_ui)


def _common(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--model", required=True, help="model directory (or a shipped model's name)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--api-key", default=os.environ.get("MMBRIDGE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (UI: KEY as password); default $MMBRIDGE_API_KEY")
    parser.add_argument("--keep-uploads", action="store_true", help="keep UI uploads in Gradio's cache folder")
    from mmbridge.commands.chat import add_decode_arguments

    add_decode_arguments(parser)  # --dtype, --quantize, --merge-adapters


def resolve_model(name_or_dir: str) -> Path:
    from mmbridge.cli import CLIError

    try:
        from mmbridge.models import resolve_model_path  # shipped-model names, once that exists
    except ImportError:
        resolve_model_path = None
    if resolve_model_path is not None:
        try:
            return Path(resolve_model_path(name_or_dir))
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise CLIError(str(err)) from None
    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        raise CLIError(f"model {name_or_dir!r} is not a directory")
    if not (path / "config.json").is_file():
        raise CLIError(f"{path} has no config.json; is it an mmbridge model directory?")
    return path


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if not local and not api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)


def _serve(args) -> int:
    from mmbridge.cli import CLIError

    path = resolve_model(args.model)  # user errors first, before the slow imports
    try:
        import uvicorn

        from mmbridge.generation import MMBridgePipeline
        from mmbridge.serve.app import ServeSettings, create_app
        from mmbridge.serve.images import RemoteFetcher
    except ImportError as err:
        raise CLIError(f"serving needs the 'serve' extra: pip install 'mmbridge[serve]' ({err.name} missing)") from None
    for value, name in ((args.max_batch_size, "--max-batch-size"), (args.max_images, "--max-images"),
                        (args.max_n, "--max-n"), (args.default_max_tokens, "--default-max-tokens"),
                        (args.max_input_tokens or 1, "--max-input-tokens"), (args.max_stop_chars, "--max-stop-chars"),
                        (args.max_request_image_pixels, "--max-request-image-pixels")):
        if value < 1:
            raise CLIError(f"{name} must be >= 1")
    settings = ServeSettings(
        model_name=args.served_model_name or path.name, api_key=args.api_key, max_images=args.max_images,
        max_n=args.max_n, default_max_tokens=args.default_max_tokens, max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, ui=args.ui, keep_uploads=args.keep_uploads,
        image_fetcher=RemoteFetcher(args.allow_remote_images) if args.allow_remote_images else None,
        max_input_tokens=args.max_input_tokens, max_stop_chars=args.max_stop_chars,
        max_request_image_pixels=args.max_request_image_pixels, body_timeout_s=args.body_timeout,
        queue_timeout_s=args.queue_timeout, shutdown_timeout_s=args.shutdown_timeout,
    )
    _warn_if_exposed(args.host, args.api_key)
    app = create_app(_Loader(path, MMBridgePipeline, **_decode_options(args)), settings)  # loads in the background
    state = app.state.mmbridge
    # A model that fails to load ends the process with status 2 and one line naming the cause, so an
    # orchestrator restarts or reports it instead of probing a 503 forever. Nothing was served yet (every
    # request got 503 model_loading), so there is nothing to drain: exit at once.
    state.on_load_failure = lambda: _exit_load_failed(state.error_detail)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=settings.shutdown_timeout_s)
    if state.error:
        raise CLIError(f"the model failed to load: {state.error_detail}")
    return 0


def _exit_load_failed(detail: str | None) -> None:
    print(f"mmbridge serve: error: the model failed to load: {detail}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def _decode_options(args) -> dict:
    import torch

    return {"dtype": getattr(torch, args.dtype), "quantize": args.quantize, "merge_adapters": args.merge_adapters}


class _Loader:
    """`MMBridgePipeline.from_pretrained(path, **options)`, with the path at hand for the load-failure message."""

    def __init__(self, path: Path, pipeline_class, **options):
        self.path, self.pipeline_class, self.options = path, pipeline_class, options

    def __call__(self):
        return self.pipeline_class.from_pretrained(self.path, **self.options)


def _ui(args) -> int:
    from mmbridge.cli import CLIError

    path = resolve_model(args.model)
    try:
        from mmbridge.generation import MMBridgePipeline
        from mmbridge.serve.ui import launch_ui
    except ImportError as err:
        raise CLIError(f"the UI needs the 'serve' extra: pip install 'mmbridge[serve]' ({err.name} missing)") from None
    _warn_if_exposed(args.host, args.api_key)
    launch_ui(MMBridgePipeline.from_pretrained(path, **_decode_options(args)), host=args.host, port=args.port,
              api_key=args.api_key, keep_uploads=args.keep_uploads)
    return 0
