"""Tool calls in gptkit's own chat templates: how the tools are shown to the model, how its calls
are written, and how they are read back from its output.

The format is the one Qwen2.5 and Hermes models use (so a model fine-tuned on such data, or
imported with a template that uses it, reads and writes the same text):

- the tools, as OpenAI's `tools` entries in JSON lines inside <tools></tools>, are described at the
  end of the system message (TOOLS_HEADER);
- a call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, several on
  consecutive lines, in the assistant's message;
- a tool's result is a message of role `tool` (ChatML: `<|im_start|>tool`; plain: `Tool: ...`).

An imported model's Jinja template receives `tools` and the messages' `tool_calls` itself.
"""

from __future__ import annotations

import json
import re
import uuid

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tools_text(tools: list[dict]) -> str:
    """The block appended to the system message: every tool on one JSON line."""
    return TOOLS_HEADER.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def call_text(name: str, arguments: dict | str) -> str:
    """One call as the model writes it (compact JSON, as the grammar of a required call forces)."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return CALL_OPEN + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + CALL_CLOSE


def assistant_text(content: str | None, tool_calls: list[dict]) -> str:
    """An assistant message's text: its content, then each call on its own lines."""
    calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in tool_calls]
    return "\n".join(([content] if content else []) + calls)


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content, calls) of a reply: every well-formed call to a known function becomes an OpenAI
    tool call (arguments as a JSON string); the text around them is the content (None if empty).
    A block that does not parse, or names another function, stays in the content as text."""
    calls: list[dict] = []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments"), dict)):
            return match.group(0)
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}})
        return ""

    content = _CALL.sub(take, text).strip()
    return (content or None), calls


def call_schema(tools: list[dict]) -> dict:
    """The JSON schema of one call to any of `tools`: {"name": one of them, "arguments": its parameters}."""
    return {"anyOf": [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
