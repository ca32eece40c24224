"""AsyncEngine: an LLMEngine stepping in a background thread, with asyncio-facing requests.

The event loop never runs the model. New requests and aborts are handed to the engine
thread under a lock and applied between steps; each step's outputs are put on the
requesting coroutine's asyncio.Queue with call_soon_threadsafe. A consumer that stops
iterating (client disconnected, task cancelled) aborts its request, which frees its
sequences' blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import LLMEngine
from .request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


# Python hands the GIL to a waiting thread only every switch interval (5 ms by default): while the
# event loop is busy with a step's outputs, the engine thread, done waiting for the device, would
# sit up to 5 ms before it can launch the next step (measured on the CPU: 5.2 ms mean wake-up delay
# against a busy thread at 5 ms, 0.7 ms at 0.5 ms). The server shortens it while the engine runs.
ENGINE_SWITCH_INTERVAL_S = 0.0005


class AsyncEngine:
    def __init__(self, engine: LLMEngine, switch_interval: float | None = ENGINE_SWITCH_INTERVAL_S) -> None:
        """Start the engine thread. switch_interval: the process's GIL switch interval while it runs
        (None leaves it alone); the previous value comes back at shutdown."""
        self.engine = engine
        self._previous_switch_interval = sys.getswitchinterval()
        if switch_interval is not None:
            sys.setswitchinterval(switch_interval)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._pending: list[_Pending] = []
        self._aborts: list[str] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="qwen-int4-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)
        sys.setswitchinterval(self._previous_switch_interval)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes; ValueError at once for a request the engine cannot take."""
        self.engine.check_request(prompt_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._pending.append(_Pending(request_id, prompt_ids, params))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
                if not finished:
                    self._aborts.append(request_id)
            self._wakeup.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wakeup.set()

    # ---- engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped:
            self._wakeup.clear()
            with self._lock:
                pending, self._pending = self._pending, []
                aborts, self._aborts = self._aborts, []
            for request_id in aborts:
                self.engine.abort_request(request_id)
            for p in pending:
                try:
                    self.engine.add_request(p.request_id, p.prompt_ids, p.params)
                except Exception as exc:  # checked before queueing, so rare (e.g. a duplicate id)
                    self._deliver(p.request_id, exc)
            if not self.engine.has_unfinished():
                self._wakeup.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails the requests in it, not the server
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            self._deliver_step(outputs)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their queues: one wake-up per event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for output in outputs:
                target = self._queues.get(output.request_id)
                if target is not None:  # else the consumer is gone; its abort is on the way
                    by_loop.setdefault(target[0], []).append((target[1], output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed
                pass

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._queues.get(request_id)
        if target is None:  # the consumer is gone; its abort is on the way
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed
            pass

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self._deliver(request_id, RuntimeError(f"the engine failed while running this request: {exc}"))


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
