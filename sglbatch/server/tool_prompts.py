"""Tools in prompts: for chat templates that take no `tools=`, the tools go into the system
message and past calls and tool results become text, in the format's own words."""

from __future__ import annotations

import json
from typing import Any

from sglbatch.server.tool_calls import validate_tools
from sglbatch.server.tool_formats import ToolCallFormat, get_format


def chat_template_supports_tools(chat_template: str | None) -> bool:
    """Whether a Jinja chat template renders a `tools=` argument (a textual check)."""
    if not chat_template:
        return False
    return "tools" in chat_template


def tools_system_prompt(tools: Any, parser_name: str) -> str:
    """System-prompt text describing `tools` in `parser_name`'s call format.

    For chat templates that take no `tools=`: prepend it to (or make it) the system
    message. It mirrors what the Qwen2.5 and Llama 3.1 templates themselves render.
    """
    fmt = get_format(parser_name)
    specs = validate_tools(tools)
    return fmt.system_prompt(specs) if specs else ""


def _call_text(name: str, args: Any, fmt: ToolCallFormat) -> str:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    return fmt.call_text(name, args)


def prepare_messages(messages: list[dict[str, Any]], tools: Any, parser_name: str,
                     template_supports_tools: bool) -> list[dict[str, Any]]:
    """Messages ready for `tokenizer.apply_chat_template` in a tool-using conversation.

    * template_supports_tools: assistant `tool_calls[*].function.arguments` JSON strings
      become dicts (what the HF templates expect, as SGLang and vLLM do); pass
      `tools=tools` to the template yourself.
    * otherwise: `tools_system_prompt` is merged into the first system message (or a new
      one); assistant tool calls become text in the parser's format and `role: "tool"`
      messages become user messages, so any template can render them.
    The input is not modified.
    """
    out: list[dict[str, Any]] = []
    if template_supports_tools:
        for m in messages:
            m = dict(m)
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    c = dict(c)
                    fn = dict(c.get("function") or {})
                    a = fn.get("arguments")
                    if isinstance(a, str):
                        try:
                            fn["arguments"] = json.loads(a) if a.strip() else {}
                        except json.JSONDecodeError:
                            pass
                    c["function"] = fn
                    calls.append(c)
                m["tool_calls"] = calls
            out.append(m)
        return out

    fmt = get_format(parser_name)
    prompt = tools_system_prompt(tools, parser_name) if tools else ""
    sys_done = not prompt
    for m in messages:
        m = dict(m)
        role = m.get("role")
        if role == "system" and not sys_done:
            content = m.get("content") or ""
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            m["content"] = f"{content}\n\n{prompt}" if content else prompt
            sys_done = True
        elif role == "assistant" and m.get("tool_calls"):
            parts = [_call_text((c.get("function") or {}).get("name", ""),
                                (c.get("function") or {}).get("arguments", {}), fmt)
                     for c in m["tool_calls"]]
            text = fmt.calls_joiner.join(parts)
            content = m.get("content")
            m = {"role": "assistant", "content": f"{content}\n{text}" if content else text}
        elif role == "tool":
            content = m.get("content") or ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            text = fmt.tool_result_text(content)
            # consecutive tool results go into one user message
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + text
                continue
            m = {"role": "user", "content": text, "_tool_results": True}
        out.append(m)
    for m in out:
        m.pop("_tool_results", None)
    if not sys_done:
        out.insert(0, {"role": "system", "content": prompt})
    return out
