"""Function calling through Qwen's ReAct prompt (spec section 8; openai_api.py).

The tools are described in REACT_INSTRUCTION, which is put before the latest user
question; the model answers either
    Thought: ...\\nAction: name\\nAction Input: arguments\\nObservation:   (a call; "Observation:" is a stop)
or  Thought: I now know the final answer\\nFinal Answer: text
and parse_response tells which. ReActStream makes the same decision on streamed text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API."
    " What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

OBSERVATION_STOP = "Observation:"
_ACTION, _ACTION_INPUT, _OBSERVATION, _FINAL = "\nAction:", "\nAction Input:", "\nObservation:", "\nFinal Answer: "


def react_instruction(functions: list[dict[str, Any]]) -> str:
    """REACT_INSTRUCTION filled with TOOL_DESC of each function (Qwen's *_for_model keys win)."""
    tools_text, names = [], []
    for f in functions:
        name = f.get("name", "")
        name_m = f.get("name_for_model", name)
        tools_text.append(TOOL_DESC.format(
            name_for_model=name_m,
            name_for_human=f.get("name_for_human", name),
            description_for_model=f.get("description_for_model", f.get("description", "")),
            parameters=json.dumps(f.get("parameters") or {}, ensure_ascii=False),
        ))
        names.append(name_m)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(tools_text), tools_name_text=", ".join(names)).strip()


def render_call(thought: str, name: str, arguments: str) -> str:
    """An assistant turn that called a function, as the model wrote it."""
    if not thought.startswith("Thought:"):
        thought = f"Thought: {thought}"
    return f"{thought}\nAction: {name}\nAction Input: {arguments}"


def render_answer(content: str) -> str:
    """An assistant turn without a call, when functions are in play."""
    return f"Thought: I now know the final answer.\nFinal Answer: {content}"


def render_observation(result: str, last: bool) -> str:
    """A function result, appended to the assistant turn that called it; the last one prompts the next Thought."""
    return f"\nObservation: {result}" + ("\nThought:" if last else "")


@dataclass
class ParsedReply:
    content: str
    name: str | None = None  # set when the reply is a function call
    arguments: str | None = None


def parse_response(text: str) -> ParsedReply:
    """The reference's parse_response: a call if "\\nAction:" precedes "\\nAction Input:", else the
    text after the last "\\nFinal Answer: " (or all of it)."""
    i, j, k = text.find(_ACTION), text.find(_ACTION_INPUT), text.find(_OBSERVATION)
    if 0 <= i < j:
        if k < j:  # the Observation stop word was cut off: put it back to delimit the arguments
            text = text.rstrip() + _OBSERVATION
            k = text.find(_OBSERVATION)
        name = text[i + len(_ACTION):j].strip()
        arguments = text[j + len(_ACTION_INPUT):k].strip()
        if name:
            thought = text[:i]
            t = thought.find("Thought: ")
            if t >= 0:
                thought = thought[t + len("Thought: "):]
            return ParsedReply(thought.strip(), name, arguments)
    z = text.rfind(_FINAL)
    return ParsedReply(text[z + len(_FINAL):] if z >= 0 else text)


class ReActStream:
    """Streamed text -> content to emit now, and at the end the call (if any).

    Text is held back until the reply's kind is known: after "\\nFinal Answer: " (and no
    "\\nAction:" before it) the answer streams as it comes; after "\\nAction:" it is a call,
    emitted whole at the end; a reply with neither is emitted at the end. (parse_response
    takes the *last* Final Answer; a stream can only take the first: they differ only for
    a reply with two.)
    """

    def __init__(self) -> None:
        self.text = ""
        self._answer_from: int | None = None  # start of the answer in `text`, once known
        self._sent = 0

    def feed(self, delta: str) -> str:
        self.text += delta
        if self._answer_from is None and _ACTION not in self.text:
            z = self.text.find(_FINAL)
            if z >= 0:
                self._answer_from = self._sent = z + len(_FINAL)
        if self._answer_from is None:
            return ""
        piece, self._sent = self.text[self._sent:], len(self.text)
        return piece

    def finish(self) -> ParsedReply:
        """The rest of the content (not yet emitted) and the call, if the reply is one."""
        if self._answer_from is not None:
            return ParsedReply(self.text[self._sent:])
        return parse_response(self.text)
