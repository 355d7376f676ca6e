"""Dynamic batching: concurrent requests share one `pipeline.generate` forward pass.

One worker thread owns the model (a CPU/GPU runs one generate at a time best anyway). Requests wait
in a bounded queue; the worker takes the oldest, then gathers more *compatible* ones (same sampling
options, so one `GenerationConfig` fits all) for up to `max_wait_ms`, up to `max_batch_size` rows,
and runs them as one left-padded batch in which each row stops on its own. Requests that arrive
while a batch runs are batched next time, so under load the window rarely costs anything.

Admission control: at most `max_batch_size` rows run and `max_queue` requests wait; past that
`submit` raises `Overloaded` immediately (the API turns it into 429 + Retry-After) instead of
letting memory and latency grow without bound.

Cancellation: each request has a `cancel` event. Waiting requests are dropped; running rows are
stopped at the next decoding step by a `StoppingCriteria` that reads the events, so a client that
goes away frees its slot within one token.

Streaming requests join the same dynamic batches as the others (same sampling options, same
`pipeline.generate`): a per-row tap (a `StoppingCriteria`, which sees every row's newest token at each
step) decodes each streaming row and hands new text to the request's `on_piece` callback, which only
schedules it on the event loop — a slow client never stalls the batch. Text that may still change is
held back (a possible stop-string start, trailing whitespace, an incomplete UTF-8 sequence, anything
after a head trigger); after `generate` each row's remainder is sent, so the pieces join to exactly the
non-streaming answer.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mmbridge.generation import GenerationResult, SamplingOptions

log = logging.getLogger(__name__)
_unique = itertools.count()


class Overloaded(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"server busy, retry after {retry_after}s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The request was cancelled (client gone) before it produced a result."""


@dataclasses.dataclass(eq=False)
class Job:
    conversation: list[dict]
    options: SamplingOptions
    n: int = 1
    #: streaming only: called from the worker thread with (choice index, text piece)
    on_piece: Callable[[int, str], None] | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    future: Future = dataclasses.field(default_factory=Future)  # -> list[GenerationResult], one per choice
    key: tuple = ()
    enqueued: float = dataclasses.field(default_factory=time.monotonic)
    started: bool = False  # taken off the queue by the worker

    @property
    def stream(self) -> bool:
        return self.on_piece is not None


class _CancelRows(StoppingCriteria):
    """Per-row stop signal: row i stops once `events[i]` is set."""

    def __init__(self, events: list[threading.Event]):
        self.events = events

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([e.is_set() for e in self.events], device=input_ids.device)


class _StreamRows(StoppingCriteria):
    """Streams the rows that belong to streaming requests while the batch generates (never stops a row).

    Each step it decodes a streaming row's answer so far exactly as `pipeline._result` will (cut at EOS,
    special tokens skipped, cut at the first stop string, stripped) and emits the part that can no longer
    change; `finish` sends the rest from the final result."""

    def __init__(self, taps: list[tuple[Job, int] | None], pipeline, options: SamplingOptions):
        tokenizer = pipeline.processor.tokenizer
        self.taps, self.tokenizer = taps, tokenizer
        self.eos = tokenizer.eos_token_id
        self.triggers = set(getattr(pipeline, "trigger_ids", {}) or {})
        self.stops = [stop for stop in options.stop_strings(pipeline.processor) if stop]
        self.tokens: list[list[int]] = [[] for _ in taps]
        self.closed = [tap is None for tap in taps]  # nothing more to stream incrementally
        self.emitted = [""] * len(taps)

    def __call__(self, input_ids, scores, **kwargs):
        newest = input_ids[:, -1].tolist()
        for row, token in enumerate(newest):
            if self.closed[row]:
                continue
            if token == self.eos or token in self.triggers:  # head parts: the rest comes with the result
                self.closed[row] = True
                continue
            self.tokens[row].append(token)
            self._emit(row)
        return torch.zeros(len(newest), dtype=torch.bool, device=input_ids.device)

    def _emit(self, row: int) -> None:
        job, index = self.taps[row]
        if job.cancel.is_set():
            self.closed[row] = True
            return
        raw = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        hits = [raw.find(stop) for stop in self.stops if stop in raw]
        cut, stopped = (raw[: min(hits)], True) if hits else (raw, False)
        safe = cut if stopped else cut[: len(cut) - self._held_back(cut)]
        safe = safe.rstrip("\ufffd")  # an incomplete multi-byte character decodes as U+FFFD for now
        visible = safe.strip()
        if stopped:
            self.closed[row] = True
        if len(visible) > len(self.emitted[row]) and visible.startswith(self.emitted[row]):
            job.on_piece(index, visible[len(self.emitted[row]):])
            self.emitted[row] = visible

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that may be the start of a stop string."""
        for k in range(min(len(text), max((len(s) for s in self.stops), default=0)), 0, -1):
            if any(stop.startswith(text[-k:]) for stop in self.stops):
                return k
        return 0

    def finish(self, row: int, result: GenerationResult) -> None:
        """After generate: send what the final answer has beyond what was streamed."""
        job, index = self.taps[row]
        final, sent = result.text, self.emitted[row]
        if job.cancel.is_set():
            return
        if not final.startswith(sent):  # not expected; the client's joined text would differ
            log.warning("streamed text diverged from the final answer (row %d): %r vs %r", row, sent, final)
            return
        if len(final) > len(sent):
            job.on_piece(index, final[len(sent):])


def batch_key(options: SamplingOptions) -> tuple:
    fields = dataclasses.astuple(options)
    if options.do_sample and options.seed is not None:
        # A seeded sample must not depend on who else is in the batch: run it alone.
        return (*fields, "alone", next(_unique))
    return tuple(tuple(f) if isinstance(f, list) else f for f in fields)


class Batcher:
    def __init__(self, pipeline, max_batch_size: int = 8, max_wait_ms: float = 5.0, max_queue: int = 32):
        self.pipeline = pipeline
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.max_queue = max(0, max_queue)
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._batch_seconds = 0.5  # moving average, for Retry-After
        self.stats = collections.Counter(active=0)
        #: called from the worker after each batch with (rows, seconds); the server's metrics hook
        self.on_batch: Callable[[int, float], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Batcher:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="mmbridge-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._running = False
            for job in self._queue:
                job.future.set_exception(Cancelled("server shutting down"))
            self._queue.clear()
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)

    # -- admission ---------------------------------------------------------------------------
    def submit(self, conversation: list[dict], options: SamplingOptions, n: int = 1,
               on_piece: Callable[[int, str], None] | None = None) -> Job:
        job = Job(conversation, options, n, on_piece, key=batch_key(options))
        with self._cond:
            if not self._running:
                raise Overloaded(1)
            if len(self._queue) >= self.max_queue:
                self.stats["rejected"] += 1
                raise Overloaded(self.retry_after())
            self._queue.append(job)
            self.stats["submitted"] += 1
            self._cond.notify()
        return job

    def retry_after(self) -> int:
        waves = len(self._queue) / self.max_batch_size + 1
        return max(1, min(60, math.ceil(self._batch_seconds * waves)))

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- worker ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            rows = sum(job.n for job in batch)
            self.stats["active"] = rows
            start = time.monotonic()
            try:
                self._run_batch(batch)
            except BaseException as err:  # never let the worker die; the request gets the error
                log.exception("generation failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
            finally:
                seconds = time.monotonic() - start
                self.stats["active"] = 0
                self.stats["batches"] += 1
                self.stats["rows"] += rows
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
                if self.on_batch is not None:
                    try:
                        self.on_batch(rows, seconds)
                    except Exception:  # metrics must never stop the worker
                        log.exception("batch metrics hook failed")

    def _pop_live(self, predicate=lambda job: True) -> Job | None:
        """Remove and return the first queued job matching `predicate`, dropping cancelled ones."""
        for job in list(self._queue):
            if job.cancel.is_set():
                self._queue.remove(job)
                self.stats["cancelled"] += 1
                job.future.set_exception(Cancelled())
            elif predicate(job):
                self._queue.remove(job)
                job.started = True
                return job
        return None

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                if not self._running:
                    return None
                first = self._pop_live()
                if first is not None:
                    break
                self._cond.wait()
            batch, rows = [first], first.n
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch_size:
                job = self._pop_live(lambda j, rows=rows: j.key == first.key and rows + j.n <= self.max_batch_size)
                if job is not None:
                    batch.append(job)
                    rows += job.n
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._running:
                    break
                self._cond.wait(remaining)
            return batch

    def _run_batch(self, batch: list[Job]) -> None:
        conversations = [job.conversation for job in batch for _ in range(job.n)]
        events = [job.cancel for job in batch for _ in range(job.n)]
        criteria = [_CancelRows(events)]
        taps = [(job, index) if job.stream else None for job in batch for index in range(job.n)]
        streams = _StreamRows(taps, self.pipeline, batch[0].options) if any(taps) else None
        if streams is not None:
            criteria.append(streams)
        results = self.pipeline.generate(conversations, options=batch[0].options,
                                         stopping_criteria=StoppingCriteriaList(criteria))
        if streams is not None:
            for row, tap in enumerate(taps):
                if tap is not None:
                    streams.finish(row, results[row])
        offset = 0
        for job in batch:
            mine, offset = results[offset:offset + job.n], offset + job.n
            self._finish(job, mine)

    def _finish(self, job: Job, results: list[GenerationResult]) -> None:
        if job.cancel.is_set():
            self.stats["cancelled"] += 1
            job.future.set_exception(Cancelled())
        else:
            self.stats["completed"] += 1
            job.future.set_result(results)
