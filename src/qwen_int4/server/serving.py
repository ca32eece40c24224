"""What the chat and completion endpoints share: errors, sampling parameters, engine calls, SSE."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request as HTTPRequest

from ..config import GenerationConfig
from ..engine.async_engine import AsyncEngine
from ..engine.request import RequestOutput, SamplingParams
from ..tokenizer import QWenTokenizer
from .metrics import Metrics
from .protocol import ErrorInfo, ErrorResponse, SamplingRequest, UsageInfo


class ServingError(Exception):
    """An error answered with the OpenAI error body; the openai client raises e.g. BadRequestError (400)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        info = ErrorInfo(message=str(self), type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


@dataclass
class ServingContext:
    """What the endpoints need once the model is loaded."""

    engine: AsyncEngine
    tokenizer: QWenTokenizer
    model_names: list[str]
    generation_config: GenerationConfig
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise ServingError(f"The model `{name}` does not exist; this server serves {self.model_names}",
                               status=404, param="model", code="model_not_found")

    def sampling_params(self, req: SamplingRequest, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                        stop_token_ids: list[int], extra_stop: list[str] = ()) -> SamplingParams:
        """The request's options; unset ones come from the checkpoint's generation_config.json
        (Qwen-7B-Chat: top_p 0.8, top_k 0, repetition_penalty 1.1), max_tokens from the context left."""
        gen = self.generation_config
        temperature = req.temperature if req.temperature is not None else (gen.temperature if gen.do_sample else 0.0)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if max_tokens is not None and max_tokens < 1:
            raise ServingError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        params = SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else max(self.max_model_len - prompt_len, 1),
            temperature=temperature,
            top_p=req.top_p if req.top_p is not None else gen.top_p,
            top_k=req.top_k if req.top_k is not None else gen.top_k,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else gen.repetition_penalty,
            n=req.n,
            seed=req.seed,
            stop=stop + [s for s in extra_stop if s not in stop],
            stop_token_ids=list(stop_token_ids) + list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )
        try:
            params.validate()
        except ValueError as exc:
            raise ServingError(str(exc), param=str(exc).split()[0]) from None
        return params

    async def start(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt_param: str = "messages") -> AsyncIterator[RequestOutput]:
        """Validate against the engine (context length ...) before any response starts, then run."""
        try:
            self.engine.engine.check_request(prompt_ids, params)
        except ValueError as exc:
            param = "max_tokens" if "max_tokens" in str(exc) else prompt_param
            raise ServingError(str(exc), param=param, code="context_length_exceeded"
                               if "context length" in str(exc) else None) from None
        return self.engine.generate(request_id, prompt_ids, params)

    def observe_ttft(self, out: RequestOutput) -> None:
        """Record the time to first token, on the output that carries the request's first token(s)."""
        new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
        if out.time_to_first_token is not None and new_tokens and out.num_generated_tokens == new_tokens:
            self.metrics.observe_ttft(out.time_to_first_token)

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        data = self.tokenizer.decode_bytes([token_id])
        return data.decode("utf-8", errors="replace"), list(data)


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def sse(data: BaseModel | dict | str) -> str:
    """One server-sent event: `data: {...}\\n\\n`."""
    if isinstance(data, BaseModel):
        data = data.model_dump_json()
    elif isinstance(data, dict):
        data = json.dumps(data, ensure_ascii=False)
    return f"data: {data}\n\n"


async def until_disconnected(outputs: AsyncIterator[Any], http: HTTPRequest, poll_s: float = 0.5) -> AsyncIterator[Any]:
    """Pass items through; stop (closing `outputs`, which aborts the request) if the client goes away.

    The connection is checked every poll_s seconds, whether or not items are arriving.
    """
    iterator = outputs.__aiter__()
    last_check = time.monotonic()
    while True:
        next_item = asyncio.ensure_future(iterator.__anext__())
        while not next_item.done():
            await asyncio.wait({next_item}, timeout=poll_s)
            if time.monotonic() - last_check < poll_s:
                continue
            last_check = time.monotonic()
            if await http.is_disconnected():
                next_item.cancel()  # raises CancelledError inside the generator: it aborts the request
                await asyncio.gather(next_item, return_exceptions=True)
                await outputs.aclose()
                return
        try:
            item = next_item.result()
        except StopAsyncIteration:
            return
        yield item


async def merge(iterators: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(source index, output) from several iterators as they come (a batch of completion prompts)."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(i: int, it: AsyncIterator[RequestOutput]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except Exception as exc:  # handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
