"""POST /v1/completions: continue raw text (or token ids); a batch of prompts gives n choices each.

The prompt string is encoded as the reference tokenizer does by default (special-token
text such as <|im_start|> becomes the special token). Generation stops at <|endoftext|>
(the checkpoint's eos), the request's stop strings and stop_token_ids, or max_tokens.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from ..engine.request import CompletionOutput, RequestOutput, TokenLogprob
from .protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from .serving import ServingContext, ServingError, merge, sse, until_disconnected, usage

MAX_LOGPROBS = 20


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, http: HTTPRequest) -> Response | dict:
        ctx = self.ctx
        ctx.check_model(req.model)
        if req.echo or req.suffix:
            raise ServingError("echo and suffix are not supported", param="echo" if req.echo else "suffix")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise ServingError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {req.logprobs}", param="logprobs")
        prompts = self._prompts(req.prompt)
        request_id = random_id("cmpl")
        runs = []
        for i, ids in enumerate(prompts):  # all are validated before any starts
            params = ctx.sampling_params(req, len(ids), req.max_tokens, req.logprobs, stop_token_ids=[])
            runs.append((f"{request_id}-{i}", ids, params))
        iterators = [await ctx.start(*run, prompt_param="prompt") for run in runs]
        prompt_tokens = sum(len(ids) for ids in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(request_id, req, iterators, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        return await self._whole(request_id, req, iterators, prompt_tokens, http)

    def _prompts(self, prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.ctx.tokenizer.encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.ctx.tokenizer.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise ServingError("prompt must be a string, a list of strings, a list of token ids or a list of them",
                               param="prompt")
        if any(not p for p in prompts):
            raise ServingError("the prompt is empty: give at least one token", param="prompt")
        return prompts

    async def _whole(self, request_id: str, req: CompletionRequest, iterators: list[AsyncIterator[RequestOutput]],
                     prompt_tokens: int, http: HTTPRequest) -> Response | dict:
        final: dict[int, CompletionOutput] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        finished = 0
        async for i, out in until_disconnected(merge(iterators), http):
            self.ctx.observe_ttft(out)
            for c in out.outputs:
                index = i * req.n + c.index
                final[index] = c
                logprobs.setdefault(index, []).extend(c.delta_logprobs)
            finished += out.finished
        if finished < len(iterators):
            for it in iterators:
                await it.aclose()
            return Response(status_code=499)  # the client went away
        choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                    logprobs=self._logprobs(logprobs[i]) if req.logprobs is not None else None)
                   for i, c in sorted(final.items())]
        n_tokens = sum(len(c.token_ids) for c in final.values())
        return CompletionResponse(id=request_id, model=req.model, choices=choices,
                                  usage=usage(prompt_tokens, n_tokens)).model_dump()

    async def _stream(self, request_id: str, req: CompletionRequest, iterators: list[AsyncIterator[RequestOutput]],
                      prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        n_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        try:
            async for i, out in merge(iterators):
                self.ctx.observe_ttft(out)
                for c in out.outputs:
                    index = i * req.n + c.index
                    n_tokens[index] = len(c.token_ids)
                    lp = None
                    if req.logprobs is not None and c.delta_logprobs:
                        lp = self._logprobs(c.delta_logprobs, offsets.get(index, 0))
                        offsets[index] = lp.text_offset[-1] + len(lp.tokens[-1])
                    if c.delta_text or lp or c.finish_reason is not None:
                        choice = CompletionChoice(index=index, text=c.delta_text, logprobs=lp,
                                                  finish_reason=c.finish_reason)
                        yield sse(CompletionResponse(id=request_id, created=created, model=req.model, choices=[choice]))
            if include_usage:
                yield sse(CompletionResponse(id=request_id, created=created, model=req.model, choices=[],
                                             usage=usage(prompt_tokens, sum(n_tokens.values()))))
        except Exception as exc:  # the engine failed: tell the client in-band, the status is already 200
            yield sse(ServingError(str(exc), status=500, type="internal_server_error").body())
        finally:
            for it in iterators:
                await it.aclose()
        yield "data: [DONE]\n\n"

    def _logprobs(self, items: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in items:
            text, _ = self.ctx.token_text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.ctx.token_text(t)[0]: v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out
