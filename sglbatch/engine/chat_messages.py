"""Chat messages checked as OpenAI checks them, before any template sees them: a template
renders an unknown role or a number as content without complaint, and the model then
generates from a prompt nobody meant."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


def validate_messages(messages: Any, where: str = "messages") -> None:
    """ValueError naming the first bad field, e.g. `messages[1].role: 'wizard' is not one
    of [...]`. Content is a string or a list of parts ({"type": ..., ...}); an assistant
    message may carry tool_calls instead of content; a tool message needs tool_call_id."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of "
                         "{'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{at}: expected an object with `role` and `content`, got "
                             f"{type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise ValueError(f"{at}.role: missing; one of {list(ROLES)} is required")
        if role not in ROLES:
            raise ValueError(f"{at}.role: {role!r} is not one of {list(ROLES)}")
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                continue
            raise ValueError(f"{at}.content: missing; give a string or a list of content "
                             "parts" + (" (or tool_calls)" if role == "assistant" else ""))
        _check_content(content, f"{at}.content")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise ValueError(f"{at}.tool_call_id: a tool message needs the id (a string) of "
                             "the tool call it answers")


def _check_content(content: Any, at: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(f"{at}: expected a string or a list of content parts, got "
                         f"{type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ValueError(f"{at}[{j}]: expected a content part such as "
                             "{'type': 'text', 'text': ...}")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise ValueError(f"{at}[{j}].text: expected a string")
