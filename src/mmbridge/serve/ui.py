"""Gradio web UI: chat about images with streamed answers (`mmbridge ui`, or `/ui` under `serve --ui`).

The UI talks to the same `Batcher` as the HTTP API, so it shares its limits (queue, 429-style
"busy" errors) and its cancellation (closing the tab stops the generation).

The same rules as the API: an upload is read as bytes and goes through the API's one image guard
(`ImagePolicy`: size, format allowlist, pixels from the header) before anything decodes it — the image
component is a `guarded_image` (`image_mode=None`, `type="filepath"`: Gradio hands over the upload's own
path without converting or decoding it); uploads are capped at the API's image size (`max_file_size`);
image URLs are never fetched (the API refuses remote images by default); the login page says the
password is the API key.

Privacy: uploads live in memory. Gradio must receive a file on disk first; the handler reads it,
validates it and deletes it at once (also when it is refused) unless `keep_uploads=True`; Gradio's
cache sweeper removes abandoned ones (never sent) within minutes. The conversation (with the images)
is per-session state, never written anywhere.

Wave 2: the model's answer is a list of typed parts; `render_parts` turns them into chat messages.
Text is markdown; an image the model drew (the draw head) is a `gr.Image` message shown inline. Gradio
writes it as a PNG into its own cache folder (never a folder of ours), from which the browser fetches
it; the same sweeper as for abandoned uploads (`delete_cache`) removes it within ~6 minutes, and Gradio
removes its cache when the app shuts down. Detections still render as one line of text.
"""

from __future__ import annotations

import hmac
import os
import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
from gradio_client import utils as client_utils

from mmbridge.generation import GenerationResult, SamplingOptions, part_to_text
from mmbridge.serve.batching import Batcher, Overloaded
from mmbridge.serve.images import ImageInputError, ImagePolicy, open_image


class BatcherBackend:
    """Streams answers through a batcher (looked up lazily: the model may still be loading)."""

    def __init__(self, get_batcher: Callable[[], Batcher | None], get_context: Callable[[], int]):
        self.get_batcher, self.get_context = get_batcher, get_context

    def prompt_tokens(self, conversation: list[dict]) -> int:
        return len(self._batcher().pipeline.processor.encode(conversation, add_generation_prompt=True).input_ids)

    def _batcher(self) -> Batcher:
        batcher = self.get_batcher()
        if batcher is None:
            raise gr.Error("The model is still loading; try again in a moment.")
        return batcher

    def stream(self, conversation: list[dict], options: SamplingOptions) -> Iterator[str]:
        """Yield text pieces; the generator's return value is the `GenerationResult`."""
        pieces: queue.Queue = queue.Queue()
        try:
            job = self._batcher().submit(conversation, options, 1, on_piece=lambda _, text: pieces.put(text))
        except Overloaded as busy:
            raise gr.Error(f"The server is busy; retry in {busy.retry_after}s.") from None
        job.future.add_done_callback(lambda _: pieces.put(None))
        try:
            while (piece := pieces.get()) is not None:
                yield piece
            return job.future.result()[0]
        finally:
            job.cancel.set()  # the browser left (generator closed) -> stop generating


AUTH_MESSAGE = ("Log in with any user name; the password is this server's API key "
                "(<code>--api-key</code> or <code>$MMBRIDGE_API_KEY</code>).")


def _refuse_urls(url_or_file_path) -> None:
    if url_or_file_path is not None and client_utils.is_http_url_like(str(url_or_file_path)):
        raise gr.Error("Image URLs are not fetched; upload the image file instead.")


def guarded_image(**kwargs) -> gr.Image:
    """An image input that Gradio neither fetches nor decodes: URLs are refused (no remote fetching, as
    in the API by default) and the upload's own file path (`type="filepath"`, `image_mode=None`: no
    conversion) reaches the handler, which runs the API's image guard on its bytes.

    (The guard wraps the instance's cache methods; a `gr.Image` subclass would make Gradio write a
    `.pyi` stub next to this module on import.)"""
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    move_async, move = image.async_move_resource_to_block_cache, image.move_resource_to_block_cache

    async def async_move_resource_to_block_cache(url_or_file_path):
        _refuse_urls(url_or_file_path)
        return await move_async(url_or_file_path)

    def move_resource_to_block_cache(url_or_file_path):
        _refuse_urls(url_or_file_path)
        return move(url_or_file_path)

    image.async_move_resource_to_block_cache = async_move_resource_to_block_cache
    image.move_resource_to_block_cache = move_resource_to_block_cache
    return image


def read_upload(path: str, policy: ImagePolicy, keep_uploads: bool = False):
    """An uploaded file -> RGB image through the API's guard (bytes capped, header checked before any
    decode); the file is deleted on every path unless `keep_uploads`."""
    try:
        file = Path(path)
        if file.stat().st_size > policy.max_bytes:
            raise ImageInputError(f"image is larger than the limit of {policy.max_bytes} bytes")
        return open_image(file.read_bytes(), policy)
    except ImageInputError as err:
        raise gr.Error(str(err)) from None
    finally:
        if not keep_uploads:
            _forget(path)


def password_auth(api_key: str | None):
    """Gradio login check: any user name, the API key as password. None when no key is set."""
    if not api_key:
        return None
    return lambda _user, password: hmac.compare_digest(str(password).encode(), api_key.encode())


def render_parts(result: GenerationResult) -> list[dict]:
    """Output parts -> chatbot messages: a drawn image inline (`gr.Image`, PNG), anything else through
    the parts' one serializer (`part_to_text`)."""
    return [{"role": "assistant", "content": drawn_image(part.image) if part.type == "image" else part_to_text(part)}
            for part in result.parts]


def drawn_image(image) -> gr.Image:
    """A chat message holding an image the model drew (lossless PNG, not Gradio's default WEBP)."""
    return gr.Image(value=image, type="pil", format="png", show_label=False, interactive=False)


#: Display size of a drawn image in the chat (small drawings, e.g. 64 px, are scaled up).
DRAWN_IMAGE_PX = 256
#: The UI's CSS (Gradio 6 takes it at launch / mount): images in the model's messages — only drawings are
#: there — scaled up to `DRAWN_IMAGE_PX` with sharp pixels.
UI_CSS = (f"#mmb-chat [data-testid='bot'] .image-frame img {{ width: {DRAWN_IMAGE_PX}px; "
          f"height: {DRAWN_IMAGE_PX}px; max-width: 100%; object-fit: contain; image-rendering: pixelated; }}")


def build_ui(backend: BatcherBackend, keep_uploads: bool = False, image_policy: ImagePolicy | None = None,
             title: str = "mmbridge") -> gr.Blocks:
    policy = image_policy or ImagePolicy()

    def load_upload(path: str):
        return read_upload(path, policy, keep_uploads)

    def answer(conversation, chat, max_tokens, temperature, top_p, seed):
        try:
            budget = backend.get_context() - backend.prompt_tokens(conversation)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if budget <= 0:
            raise gr.Error("The conversation is longer than the model's context; press Clear.")
        options = SamplingOptions(max_new_tokens=min(int(max_tokens), budget), do_sample=temperature > 0,
                                  temperature=temperature or 1.0, top_p=top_p,
                                  seed=None if seed is None or seed < 0 else int(seed))
        chat = chat + [{"role": "assistant", "content": ""}]
        stream, text = backend.stream(conversation, options), ""
        while True:
            try:
                text += next(stream)
            except StopIteration as done:
                result: GenerationResult = done.value
                break
            chat[-1] = {"role": "assistant", "content": text}
            yield chat, conversation
        chat = chat[:-1] + render_parts(result)
        conversation = conversation + [{"role": "assistant", "content": [{"type": "text", "text": result.raw_text}]}]
        yield chat, conversation

    def submit(message, image_path, conversation, chat, *sampling):
        if not (message or "").strip():
            raise gr.Error("Type a question first.")
        content = []
        if image_path:
            content.append({"type": "image", "image": load_upload(image_path)})
        content.append({"type": "text", "text": message})
        conversation = conversation + [{"role": "user", "content": content}]
        chat = chat + [{"role": "user", "content": ("[image] " if image_path else "") + message}]
        yield chat, conversation, "", None
        for chat_now, conversation_now in answer(conversation, chat, *sampling):
            yield chat_now, conversation_now, "", None

    def regenerate(conversation, chat, *sampling):
        if not conversation or conversation[-1]["role"] != "assistant":
            raise gr.Error("Nothing to regenerate yet.")
        conversation = conversation[:-1]
        while chat and chat[-1]["role"] == "assistant":
            chat = chat[:-1]
        yield from answer(conversation, chat, *sampling)

    # Sweeper: every minute, cached files older than 5 minutes go (uploads abandoned before sending).
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(60, 300)) as demo:
        conversation = gr.State([])  # messages with in-memory images, per browser session
        gr.Markdown(f"## {title} — chat about an image")
        with gr.Row():
            with gr.Column(scale=1):
                image = guarded_image(sources=["upload", "clipboard"], label="Image (sent with the next question)",
                                      elem_id="mmb-image")
                with gr.Accordion("Sampling", open=False):
                    max_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p")
                    seed = gr.Number(value=None, precision=0, label="Seed (blank = random)")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Conversation", elem_id="mmb-chat", height=420, feedback_options=None)
                text = gr.Textbox(placeholder="Ask about the image…", show_label=False, elem_id="mmb-input")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="mmb-send")
                    regen = gr.Button("Regenerate", elem_id="mmb-regenerate")
                    clear = gr.Button("Clear", elem_id="mmb-clear")
        sampling = [max_tokens, temperature, top_p, seed]
        for trigger in (send.click, text.submit):
            trigger(submit, [text, image, conversation, chat, *sampling], [chat, conversation, text, image])
        regen.click(regenerate, [conversation, chat, *sampling], [chat, conversation])
        clear.click(lambda: ([], [], "", None), None, [chat, conversation, text, image], queue=False)
    demo.queue(default_concurrency_limit=4)  # the batcher does the real limiting
    return demo


def _forget(path: str) -> None:
    """Delete an upload and its per-file cache folder (Gradio stores each under a hash dir)."""
    try:
        os.remove(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


def launch_ui(pipeline, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None,
              keep_uploads: bool = False, max_batch_size: int = 8, max_queue: int = 32,
              image_policy: ImagePolicy | None = None) -> None:
    """Standalone UI (`mmbridge ui`): its own batcher, Gradio's own server, never shared publicly."""
    policy = image_policy or ImagePolicy(max_pixels=min(ImagePolicy.max_pixels, pipeline.processor.max_image_pixels))
    batcher = Batcher(pipeline, max_batch_size=max_batch_size, max_queue=max_queue).start()
    context = (pipeline.processor.max_length
               or getattr(pipeline.model.config.text_config, "max_position_embeddings", 2048))
    demo = build_ui(BatcherBackend(lambda: batcher, lambda: context), keep_uploads=keep_uploads, image_policy=policy)
    try:
        demo.launch(server_name=host, server_port=port, share=False, auth=password_auth(api_key), show_error=False,
                    max_file_size=policy.max_bytes, auth_message=AUTH_MESSAGE if api_key else None, css=UI_CSS)
    finally:
        batcher.stop()
