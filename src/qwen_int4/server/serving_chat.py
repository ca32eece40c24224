"""POST /v1/chat/completions: ChatML prompt, function calling (ReAct), streamed or whole replies."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from ..engine.request import CompletionOutput, RequestOutput, TokenLogprob
from .chat_prompt import PromptError, build_chat_prompt
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    TokenLogprobInfo,
    ToolCall,
    TopLogprob,
    random_id,
    tool_call_id,
)
from .serving import ServingContext, ServingError, sse, until_disconnected, usage
from .tool_calls import OBSERVATION_STOP, ParsedReply, ReActStream, parse_response

MAX_TOP_LOGPROBS = 20


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, http: HTTPRequest) -> Response | dict:
        ctx = self.ctx
        ctx.check_model(req.model)
        functions, style = self._functions(req)
        try:
            prompt = build_chat_prompt(ctx.tokenizer, req.messages, functions, ctx.generation_config.max_window_size)
        except PromptError as exc:
            raise ServingError(str(exc), param=exc.param) from None
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise ServingError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}",
                                   param="top_logprobs")
            if not req.logprobs:
                raise ServingError("top_logprobs needs logprobs=true", param="top_logprobs")
        tok = ctx.tokenizer
        params = ctx.sampling_params(
            req, len(prompt.ids),
            max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            stop_token_ids=[tok.im_end_id, tok.im_start_id],
            extra_stop=[OBSERVATION_STOP] if functions else [],
        )
        request_id = random_id("chatcmpl")
        outputs = await ctx.start(request_id, prompt.ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(request_id, req, outputs, len(prompt.ids), style, include_usage),
                                     media_type="text/event-stream")
        return await self._whole(request_id, req, outputs, len(prompt.ids), style, http)

    @staticmethod
    def _functions(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The functions to describe in the prompt and the response style ('tools' or 'functions')."""
        if req.tools and req.tool_choice != "none":
            functions, style, choice = [t.function.model_dump(exclude_none=True) for t in req.tools], "tools", req.tool_choice
            if isinstance(choice, dict):  # a named tool: only it is offered (the model cannot be forced to call)
                choice = (choice.get("function") or {}).get("name")
        elif req.functions and req.function_call != "none":
            functions, style, choice = [f.model_dump(exclude_none=True) for f in req.functions], "functions", req.function_call
            if isinstance(choice, dict):
                choice = choice.get("name")
        else:
            return None, None
        if isinstance(choice, str) and choice not in ("auto", "required", "none"):
            functions = [f for f in functions if f.get("name") == choice]
            if not functions:
                raise ServingError(f"the requested function {choice!r} is not among the given ones", param="tool_choice")
        return functions, style

    # ---- whole response -----------------------------------------------------------------
    async def _whole(self, request_id: str, req: ChatCompletionRequest, outputs: AsyncIterator[RequestOutput],
                     prompt_tokens: int, style: str | None, http: HTTPRequest) -> Response | dict:
        final: dict[int, CompletionOutput] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        last = None
        async for out in until_disconnected(outputs, http):
            self.ctx.observe_ttft(out)
            for c in out.outputs:
                final[c.index] = c
                logprobs.setdefault(c.index, []).extend(c.delta_logprobs)
            last = out
        if last is None or not last.finished:
            return Response(status_code=499)  # the client went away; nobody reads this
        choices = []
        for index, c in sorted(final.items()):
            message, finish = self._message(c.text, c.finish_reason, style)
            choices.append(ChatChoice(index=index, message=message, finish_reason=finish,
                                      logprobs=self._logprobs(logprobs[index]) if req.logprobs else None))
        n_tokens = sum(len(c.token_ids) for c in final.values())
        return ChatCompletionResponse(id=request_id, model=req.model, choices=choices,
                                      usage=usage(prompt_tokens, n_tokens)).model_dump()

    @staticmethod
    def _message(text: str, finish_reason: str | None, style: str | None) -> tuple[ChatResponseMessage, str | None]:
        if style is None:
            return ChatResponseMessage(content=text), finish_reason
        parsed = parse_response(text)
        if parsed.name is None:
            return ChatResponseMessage(content=parsed.content), finish_reason
        call = FunctionCall(name=parsed.name, arguments=parsed.arguments or "")
        if style == "functions":
            return ChatResponseMessage(content=parsed.content, function_call=call), "function_call"
        return ChatResponseMessage(content=parsed.content or None, tool_calls=[ToolCall(function=call)]), "tool_calls"

    # ---- stream -------------------------------------------------------------------------
    async def _stream(self, request_id: str, req: ChatCompletionRequest, outputs: AsyncIterator[RequestOutput],
                      prompt_tokens: int, style: str | None, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage_info=None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=req.model, choices=choices,
                                           usage=usage_info))

        parsers = {i: ReActStream() for i in range(req.n)} if style else {}
        n_tokens: dict[int, int] = {}
        try:
            for i in range(req.n):
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for out in outputs:
                self.ctx.observe_ttft(out)
                for c in out.outputs:
                    n_tokens[c.index] = len(c.token_ids)
                    text = parsers[c.index].feed(c.delta_text) if parsers else c.delta_text
                    lp = self._logprobs(c.delta_logprobs) if req.logprobs and c.delta_logprobs else None
                    if text or lp:
                        yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(content=text), logprobs=lp)])
                    if c.finish_reason is not None:
                        for piece in self._final_chunks(c, parsers.get(c.index), style):
                            yield chunk([piece])
            if include_usage:
                yield chunk([], usage(prompt_tokens, sum(n_tokens.values())))
        except ServingError as exc:
            yield sse(exc.body())
        except Exception as exc:  # the engine failed: tell the client in-band, the status is already 200
            yield sse(ServingError(str(exc), status=500, type="internal_server_error").body())
        finally:
            await outputs.aclose()
        yield "data: [DONE]\n\n"

    @staticmethod
    def _final_chunks(c: CompletionOutput, parser: ReActStream | None, style: str | None) -> list[ChatChunkChoice]:
        finish, pieces = c.finish_reason, []
        if parser is not None:
            parsed: ParsedReply = parser.finish()
            if parsed.content:
                pieces.append(ChatChunkChoice(index=c.index, delta=DeltaMessage(content=parsed.content)))
            if parsed.name is not None:
                call = FunctionCall(name=parsed.name, arguments=parsed.arguments or "")
                if style == "functions":
                    delta, finish = DeltaMessage(function_call=call), "function_call"
                else:
                    tool_call = DeltaToolCall(index=0, id=tool_call_id(), type="function", function=call)
                    delta, finish = DeltaMessage(tool_calls=[tool_call]), "tool_calls"
                pieces.append(ChatChunkChoice(index=c.index, delta=delta))
        pieces.append(ChatChunkChoice(index=c.index, delta=DeltaMessage(), finish_reason=finish))
        return pieces

    # ---- helpers ------------------------------------------------------------------------
    def _logprobs(self, items: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for lp in items:
            text, data = self.ctx.token_text(lp.token_id)
            top = []
            for token_id, value in lp.top:
                t, d = self.ctx.token_text(token_id)
                top.append(TopLogprob(token=t, logprob=value, bytes=d))
            content.append(TokenLogprobInfo(token=text, logprob=lp.logprob, bytes=data, top_logprobs=top))
        return ChatLogprobs(content=content)
