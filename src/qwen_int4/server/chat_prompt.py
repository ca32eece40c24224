"""OpenAI chat messages -> Qwen ChatML prompt ids, as openai_api.py's parse_messages + make_context.

system: the first message if it is a system message (default "You are a helpful
assistant."); then user/assistant turns that must alternate. With functions, assistant
turns and function/tool results are rewritten in the ReAct format (tool_calls.py), and
the instruction goes before the user question of the last history turn, or of the query
when there is no history (the reference's code; spec 8 summarises it as "the latest").
When the conversation ends with an assistant turn or a function result, the prompt
continues that assistant turn (no closing <|im_end|>): the reference's text-completion mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..chat import DEFAULT_SYSTEM, make_context
from ..tokenizer import QWenTokenizer
from . import tool_calls
from .protocol import ChatMessage


class PromptError(ValueError):
    """A conversation that cannot be turned into a prompt; `param` names the offending field."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ChatPrompt:
    ids: list[int]
    system: str
    history: list[tuple[str, str]]
    query: str | None  # None: the prompt continues the last assistant turn (history[-1][1])


def _text(message: ChatMessage, index: int) -> str:
    content = message.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise PromptError(f"messages[{index}] has a {part.type!r} content part; only text is supported",
                                  f"messages.{index}.content")
            parts.append(part.text)
        content = "".join(parts)
    return (content or "").lstrip("\n").rstrip()


def _calls(message: ChatMessage) -> list[tuple[str, str]]:
    """(name, arguments) of the calls an assistant message made, legacy or tools style."""
    if message.tool_calls:
        return [(c.function.name, c.function.arguments) for c in message.tool_calls]
    if message.function_call is not None:
        return [(message.function_call.name, message.function_call.arguments)]
    return []


def build_chat_prompt(
    tokenizer: QWenTokenizer,
    messages: list[ChatMessage],
    functions: list[dict[str, Any]] | None = None,
    max_window_size: int = 6144,
) -> ChatPrompt:
    """Prompt ids for `messages`; PromptError for a conversation the reference rejects."""
    if not any(m.role == "user" for m in messages):
        raise PromptError("expecting at least one user message")
    system = DEFAULT_SYSTEM
    start = 0
    if messages[0].role == "system":
        system, start = _text(messages[0], 0), 1

    turns: list[list[str]] = []  # [role, content], merged as the reference does
    pending_calls: list[tuple[str, str]] = []  # calls of the last assistant turn still to be rendered
    for index in range(start, len(messages)):
        m, content = messages[index], _text(messages[index], index)
        last = index == len(messages) - 1
        if m.role in ("function", "tool"):
            if not turns or turns[-1][0] != "assistant":
                raise PromptError(f"messages[{index}]: expecting an assistant message before a {m.role} message")
            turns[-1][1] += tool_calls.render_observation(content, last and not pending_calls)
            if pending_calls:  # a turn with several calls: the next call follows this result
                name, arguments = pending_calls.pop(0)
                turns[-1][1] += f"\nAction: {name}\nAction Input: {arguments}" + ("\nObservation:" if last else "")
        elif m.role == "assistant":
            if not turns:
                raise PromptError(f"messages[{index}]: expecting a user message before an assistant message")
            calls = _calls(m)
            if calls:
                content = tool_calls.render_call(content, *calls[0])
                pending_calls = calls[1:]
            elif functions:
                content = tool_calls.render_answer(content)
            if turns[-1][0] == "user":
                turns.append(["assistant", content.lstrip("\n").rstrip()])
            else:
                turns[-1][1] += "\n" + content
        elif m.role == "user":
            turns.append(["user", content])
        else:
            raise PromptError(f"messages[{index}] has role {m.role!r}: expected system (first message only), "
                              "user, assistant, tool or function", f"messages.{index}.role")

    query = None
    if turns[-1][0] == "user":
        query = turns.pop()[1]
    if len(turns) % 2 or any(turns[i][0] != "user" or turns[i + 1][0] != "assistant" for i in range(0, len(turns), 2)):
        raise PromptError("roles must alternate user/assistant (tool results follow the assistant message "
                          "that called them) and the conversation must end with a user message or continue "
                          "an assistant turn")
    history = [(u, a) for (_, u), (_, a) in zip(turns[0::2], turns[1::2])]
    if functions:  # as openai_api.py's code: on the last history turn if there is one, else the query
        instruction = tool_calls.react_instruction(functions)
        if history:
            history[-1] = (f"{instruction}\n\nQuestion: {history[-1][0]}", history[-1][1])
        else:
            query = f"{instruction}\n\nQuestion: {query}"

    if query is not None:
        _, ids = make_context(tokenizer, query, history, system, max_window_size, "chatml")
    else:  # continue the last assistant turn: ChatML up to "<|im_start|>assistant\n", then its text
        user, assistant = history[-1]
        _, ids = make_context(tokenizer, user, history[:-1], system, max_window_size, "chatml")
        ids = ids + tokenizer.encode(assistant, allowed_special=set())
    return ChatPrompt(ids, system, history, query)
