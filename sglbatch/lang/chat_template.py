"""Chat templates of the frontend language (SGLang-compatible registry).

A ChatTemplate gives each role a (prefix, suffix) pair; the interpreter writes
the prefix at ``with s.user():`` entry and the suffix at exit, so the prompt
text is built incrementally (and prefix-cache friendly).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any


class ChatTemplateStyle(Enum):
    PLAIN = auto()
    LLAMA2 = auto()


@dataclass
class ChatTemplate:
    name: str
    default_system_prompt: str | None
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    stop_str: list[str] = ()
    image_token: str = "<image>"
    audio_token: str = "<audio>"
    style: ChatTemplateStyle = ChatTemplateStyle.PLAIN

    def get_prefix_and_suffix(self, role: str, hist_messages: list[dict]) -> tuple[str, str]:
        prefix, suffix = self.role_prefix_and_suffix.get(role, ("", ""))
        if self.style == ChatTemplateStyle.LLAMA2:
            # Llama-2 puts the system prompt inside the first [INST] block.
            if role == "system" and not hist_messages:
                user_prefix = self.role_prefix_and_suffix.get("user", ("", ""))[0]
                sys_prefix, sys_suffix = self.role_prefix_and_suffix.get("system", ("", ""))
                return user_prefix + sys_prefix, sys_suffix
            if (
                role == "user"
                and len(hist_messages) == 1
                and hist_messages[0]["content"] is not None
            ):
                return "", suffix
        return prefix, suffix

    def get_prompt(self, messages: list[dict]) -> str:
        parts = []
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system" and content is None:
                content = self.default_system_prompt
                if content is None:
                    continue
            prefix, suffix = self.get_prefix_and_suffix(role, messages[:i])
            parts.append(f"{prefix}{content}{suffix}")
        return "".join(parts)


chat_template_registry: dict[str, ChatTemplate] = {}
matching_function_registry: list[Callable[[str], str | None]] = []


def register_chat_template(template: ChatTemplate) -> ChatTemplate:
    chat_template_registry[template.name] = template
    return template


# Short alias (the brief's "register").
register = register_chat_template


def register_chat_template_matching_function(func):
    matching_function_registry.append(func)
    return func


def get_chat_template(name: str) -> ChatTemplate:
    try:
        return chat_template_registry[name]
    except KeyError:
        raise KeyError(
            f"unknown chat template {name!r}; known: {sorted(chat_template_registry)}"
        ) from None


def get_chat_template_by_model_path(model_path: str) -> ChatTemplate:
    for match in matching_function_registry:
        name = match(model_path or "")
        if name is not None:
            return get_chat_template(name)
    return get_chat_template("default")


def guess_chat_template_name_from_hf_template(hf_template: str | None) -> str | None:
    """Best-effort: the registry template whose markers a Jinja chat template
    (a Hugging Face tokenizer's ``chat_template``) uses, or None."""
    if not hf_template or not isinstance(hf_template, str):
        return None
    if "<|im_start|>" in hf_template:
        return "chatml"
    if "<|start_header_id|>" in hf_template:
        return "llama-3-instruct"
    if "<start_of_turn>" in hf_template:
        return "gemma-it"
    if "[INST]" in hf_template and "<<SYS>>" in hf_template:
        return "llama-2-chat"
    if "<|start_of_role|>" in hf_template:
        return "granite-3-instruct"
    return None


def get_chat_template_for_tokenizer(model_path: str, hf_tokenizer: Any = None) -> ChatTemplate:
    """The template for a model: by its path/name, else by the markers in its
    tokenizer's chat template, else "default"."""
    for match in matching_function_registry:
        name = match(model_path or "")
        if name is not None:
            return get_chat_template(name)
    name = guess_chat_template_name_from_hf_template(getattr(hf_tokenizer, "chat_template", None))
    return get_chat_template(name or "default")


def _chatml_roles() -> dict[str, tuple[str, str]]:
    return {
        "system": ("<|im_start|>system\n", "<|im_end|>\n"),
        "user": ("<|im_start|>user\n", "<|im_end|>\n"),
        "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    }


register_chat_template(
    ChatTemplate(
        name="default",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("SYSTEM:", "\n"),
            "user": ("USER:", "\n"),
            "assistant": ("ASSISTANT:", "\n"),
        },
    )
)

register_chat_template(
    ChatTemplate(
        name="claude",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("", ""),
            "user": ("\n\nHuman: ", ""),
            "assistant": ("\n\nAssistant:", ""),
        },
    )
)

register_chat_template(
    ChatTemplate(
        name="chatml",
        default_system_prompt=None,
        role_prefix_and_suffix=_chatml_roles(),
        stop_str=("<|im_end|>",),
    )
)

register_chat_template(
    ChatTemplate(
        name="chatml-llava",
        default_system_prompt="You are a helpful assistant.",
        role_prefix_and_suffix=_chatml_roles(),
        stop_str=("<|im_end|>",),
        image_token="<image>\n",
    )
)

# Qwen's HF template inserts this system prompt when none is given.
register_chat_template(
    ChatTemplate(
        name="qwen",
        default_system_prompt="You are a helpful assistant.",
        role_prefix_and_suffix=_chatml_roles(),
        stop_str=("<|im_end|>",),
    )
)

register_chat_template(
    ChatTemplate(
        name="qwen2-vl",
        default_system_prompt="You are a helpful assistant.",
        role_prefix_and_suffix=_chatml_roles(),
        stop_str=("<|im_end|>",),
        image_token="<|vision_start|><|image_pad|><|vision_end|>",
    )
)

register_chat_template(
    ChatTemplate(
        name="vicuna_v1.1",
        default_system_prompt=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        role_prefix_and_suffix={
            "system": ("", " "),
            "user": ("USER:", " "),
            "assistant": ("ASSISTANT:", "</s>"),
        },
        image_token=" <image>\n",
    )
)

register_chat_template(
    ChatTemplate(
        name="llama-2-chat",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("<<SYS>>\n", "\n<</SYS>>\n\n"),
            "user": ("[INST] ", " [/INST]"),
            "assistant": ("", " </s><s>"),
        },
        style=ChatTemplateStyle.LLAMA2,
    )
)

register_chat_template(
    ChatTemplate(
        name="mistral",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("[SYSTEM_PROMPT] ", " [/SYSTEM_PROMPT]"),
            "user": ("[INST] ", " [/INST]"),
            "assistant": ("", " </s><s>"),
        },
        stop_str=("</s>",),
        image_token="[IMG]",
    )
)

register_chat_template(
    ChatTemplate(
        name="llama-3-instruct",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
            "user": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
            "assistant": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
        },
        stop_str=("<|eot_id|>",),
        image_token="<|image|>",
    )
)

register_chat_template(
    ChatTemplate(
        name="yi-1.5",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("", ""),
            "user": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
            "assistant": ("", "<|im_end|>\n"),
        },
        stop_str=("<|im_end|>",),
    )
)

register_chat_template(
    ChatTemplate(
        name="gemma-it",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("", ""),
            "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
            "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n"),
        },
        image_token="<start_of_image>",
        audio_token="<start_of_audio>",
    )
)

register_chat_template(
    ChatTemplate(
        name="c4ai-command-r",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
            "user": ("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
            "assistant": ("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
        },
    )
)

register_chat_template(
    ChatTemplate(
        name="granite-3-instruct",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("<|start_of_role|>system<|end_of_role|>", "<|end_of_text|>"),
            "user": ("<|start_of_role|>user<|end_of_role|>", "<|end_of_text|>"),
            "assistant": ("<|start_of_role|>assistant<|end_of_role|>", "<|end_of_text|>"),
        },
        stop_str=("<|end_of_text|>",),
    )
)

register_chat_template(
    ChatTemplate(
        name="deepseek-v3",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("", ""),
            "user": ("<｜User｜>", ""),
            "assistant": ("<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
        },
        stop_str=("<｜end▁of▁sentence｜>",),
    )
)

# API backends (Gemini via Vertex AI) take role-separated messages; the text
# form is only used for display, so the plain default layout serves.
register_chat_template(
    ChatTemplate(
        name="gemini",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("SYSTEM:", "\n"),
            "user": ("USER:", "\n"),
            "assistant": ("ASSISTANT:", "\n"),
        },
    )
)
chat_template_registry["vertex"] = chat_template_registry["gemini"]


def _search(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.IGNORECASE) is not None


@register_chat_template_matching_function
def match_deepseek(model_path: str):
    if _search(r"deepseek-(v3|r1)", model_path) and not _search(r"base", model_path):
        return "deepseek-v3"
    return None


@register_chat_template_matching_function
def match_orion(model_path: str):
    return "claude" if "orion" in model_path.lower() else None


@register_chat_template_matching_function
def match_vicuna(model_path: str):
    if _search(r"vicuna|llava-v1\.5|llava-next-video-7b", model_path):
        return "vicuna_v1.1"
    return None


@register_chat_template_matching_function
def match_llama2_chat(model_path: str):
    if _search(r"llama-2.*chat|codellama.*instruct", model_path):
        return "llama-2-chat"
    return None


@register_chat_template_matching_function
def match_mistral(model_path: str):
    if _search(r"pixtral|(mistral|mixtral).*instruct", model_path):
        return "mistral"
    return None


@register_chat_template_matching_function
def match_llama3_instruct(model_path: str):
    if _search(r"llama-3.*instruct", model_path):
        return "llama-3-instruct"
    return None


@register_chat_template_matching_function
def match_chat_ml(model_path: str):
    # SmolLM2 (the sglbatch default model) and TinyLlama use plain ChatML.
    if _search(r"smollm|tinyllama", model_path):
        return "chatml"
    if _search(r"qwen.*vl", model_path):
        return "qwen2-vl"
    if _search(r"qwen.*(chat|instruct)", model_path) and not _search(r"llava", model_path):
        return "qwen"
    if _search(
        r"llava-v1\.6-34b|llava-v1\.6-yi-34b|llava-next-video-34b|llava-onevision-qwen2",
        model_path,
    ):
        return "chatml-llava"
    if _search(r"qwen", model_path):
        return "chatml"
    return None


@register_chat_template_matching_function
def match_chat_yi(model_path: str):
    if _search(r"yi-1\.5.*chat", model_path):
        return "yi-1.5"
    return None


@register_chat_template_matching_function
def match_gemma(model_path: str):
    if _search(r"(gemma.*it)|(gemma-3)", model_path):
        return "gemma-it"
    return None


@register_chat_template_matching_function
def match_c4ai_command_r(model_path: str):
    return "c4ai-command-r" if _search(r"c4ai-command-r", model_path) else None


@register_chat_template_matching_function
def match_granite_instruct(model_path: str):
    return "granite-3-instruct" if _search(r"granite.*instruct", model_path) else None


@register_chat_template_matching_function
def match_gemini(model_path: str):
    return "gemini" if _search(r"^gemini", model_path) else None


__all__ = [
    "ChatTemplate",
    "ChatTemplateStyle",
    "chat_template_registry",
    "get_chat_template",
    "get_chat_template_by_model_path",
    "get_chat_template_for_tokenizer",
    "guess_chat_template_name_from_hf_template",
    "matching_function_registry",
    "register",
    "register_chat_template",
    "register_chat_template_matching_function",
]
