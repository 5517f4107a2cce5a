"""Vertex AI (Gemini) backend of the frontend language, on the official
``google-cloud-aiplatform`` SDK's ``vertexai.generative_models``
(``pip install "sglbatch[vertexai]"``).

As SGLang's ``sgl.VertexAI``: each ``sgl.gen`` is one ``generateContent`` call
(``streamGenerateContent`` when streaming) on the program's chat messages turned
into ``Content`` parts (assistant -> role "model"); ``stop`` becomes
``stop_sequences``, ``max_tokens`` ``max_output_tokens``; ``safety_settings``
go with every call. ``sgl.select`` is not supported.

Project and location: if ``GCP_PROJECT_ID`` (and optionally ``GCP_LOCATION``) are
set, the backend calls ``vertexai.init(project=..., location=...)`` as SGLang
does; otherwise it uses what ``vertexai.init(...)`` was given before (project,
location, credentials, ``api_endpoint``, ``api_transport``...) or Google's
application-default credentials.

Differences from SGLang's backend:

* system messages become the model's ``system_instruction`` (Gemini supports
  it) instead of a fake "System prompt: ..." user turn answered "Understood.";
* parameters at their defaults are left out (no stop, ``top_k`` disabled);
* image parts are decoded from base64 before being sent (SGLang passed the
  base64 text as the bytes) and keep their MIME type;
* chunks of a stream without text (e.g. the last one, with only the finish
  reason) are skipped instead of raising; meta_info carries ``finish_reason``
  (as the local runtime's) and token counts, a stream's in a final empty chunk.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.chat_template import get_chat_template
from sglbatch.lang.ir import SglSamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from sglbatch.lang.interpreter import StreamExecutor

INSTALL_HINT = 'pip install "sglbatch[vertexai]"'


def _import_vertexai():
    try:
        import vertexai
        from vertexai import generative_models
    except ImportError as e:
        raise ImportError(
            "sglbatch.lang.backend.VertexAI needs the Vertex AI SDK "
            f"(google-cloud-aiplatform), which is not installed: {INSTALL_HINT}"
        ) from e
    return vertexai, generative_models


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _response_text(response: Any) -> str | None:
    """The text of the first candidate, or None if it has no text parts."""
    candidates = getattr(response, "candidates", None) or []
    if not candidates or candidates[0].content is None:
        return None
    texts = [p.to_dict().get("text") for p in candidates[0].content.parts]
    texts = [t for t in texts if t is not None]
    return "".join(texts) if texts else None


def _finish_reason(response: Any, completion_tokens: int | None) -> dict[str, Any] | None:
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        return None
    reason = getattr(candidates[0].finish_reason, "name", None)
    if reason in (None, "FINISH_REASON_UNSPECIFIED"):
        return None
    if reason == "MAX_TOKENS":
        return {"type": "length", "length": completion_tokens}
    return {"type": "stop", "matched": None, "stop_reason": reason}


def _meta_info(response: Any) -> dict[str, Any]:
    usage = getattr(response, "usage_metadata", None)
    completion_tokens = getattr(usage, "candidates_token_count", None)
    return {
        "finish_reason": _finish_reason(response, completion_tokens),
        "prompt_tokens": getattr(usage, "prompt_token_count", None),
        "completion_tokens": completion_tokens,
    }


class VertexAI(BaseBackend):
    def __init__(self, model_name: str, safety_settings=None) -> None:
        super().__init__()
        vertexai, self._gm = _import_vertexai()
        project_id = os.environ.get("GCP_PROJECT_ID")
        if project_id:
            vertexai.init(project=project_id, location=os.environ.get("GCP_LOCATION"))
        self.model_name = model_name
        self.chat_template = get_chat_template("default")
        self.safety_settings = safety_settings

    def get_model_name(self) -> str:
        return self.model_name

    def get_chat_template(self):
        return self.chat_template

    # ---- request building -------------------------------------------------

    def _image_part(self, url: str):
        if url.startswith("data:"):
            header, data = url.split(",", 1)
            mime_type = header[len("data:"):].split(";")[0] or "image/jpeg"
            return self._gm.Part.from_data(data=base64.b64decode(data), mime_type=mime_type)
        return self._gm.Part.from_uri(url, mime_type="image/jpeg")

    def messages_to_vertexai_input(self, messages: list[dict[str, Any]]):
        """OpenAI chat messages -> (system instruction or None, list of Content)."""
        Content, Part = self._gm.Content, self._gm.Part
        system: list[str] = []
        contents = []
        for msg in messages:
            if msg["role"] == "system":
                text = _text_of(msg["content"])
                if text:
                    system.append(text)
                continue
            parts = []
            if isinstance(msg["content"], str):
                parts.append(Part.from_text(msg["content"]))
            else:
                for part in msg["content"]:
                    if part.get("type") == "text":
                        if part["text"]:
                            parts.append(Part.from_text(part["text"]))
                    elif part.get("type") == "image_url":
                        parts.append(self._image_part(part["image_url"]["url"]))
            role = "model" if msg["role"] == "assistant" else "user"
            contents.append(Content(role=role, parts=parts))
        return ("\n\n".join(system) or None), contents

    def text_to_vertexai_input(self, text: str, images: list[tuple[str, str]]):
        """A prompt without roles with images (``(path, base64)`` pairs) at the
        chat template's image tokens -> a list of parts."""
        Part = self._gm.Part
        segments = text.split(self.chat_template.image_token)
        parts = []
        for i, segment in enumerate(segments):
            if segment:
                parts.append(Part.from_text(segment))
            if i < len(images):
                parts.append(Part.from_data(data=base64.b64decode(images[i][1]),
                                            mime_type="image/jpeg"))
        return parts

    def _generation_config(self, sampling_params: SglSamplingParams):
        kwargs = sampling_params.to_vertexai_kwargs()
        stop = kwargs.get("stop_sequences")
        if isinstance(stop, str):
            stop = [stop]
        kwargs["stop_sequences"] = [x for x in (stop or ()) if x] or None
        return self._gm.GenerationConfig(**{k: v for k, v in kwargs.items() if v is not None})

    def _call(self, s: StreamExecutor, sampling_params: SglSamplingParams, stream: bool):
        system = None
        if s.messages_:
            system, prompt = self.messages_to_vertexai_input(s.messages_)
        else:  # a single turn without roles
            images = getattr(s, "cur_images", None)
            prompt = self.text_to_vertexai_input(s.text_, images) if images else s.text_
        model = self._gm.GenerativeModel(self.model_name, system_instruction=system)
        return model.generate_content(
            prompt,
            generation_config=self._generation_config(sampling_params),
            safety_settings=self.safety_settings,
            stream=stream,
        )

    # ---- BaseBackend --------------------------------------------------------

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        response = self._call(s, sampling_params, stream=False)
        text = _response_text(response)
        if text is None:
            reason = _finish_reason(response, None)
            if reason is None or reason.get("stop_reason") not in ("STOP", None):
                # Blocked (safety, recitation, ...) or no candidate: the SDK's
                # error says why and shows the response.
                text = response.text
            text = text or ""  # stopped (stop sequence, max tokens) before any text
        return text, _meta_info(response)

    def generate_stream(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        last = None
        for response in self._call(s, sampling_params, stream=True):
            last = response
            text = _response_text(response)
            if text:
                yield text, {}
        if last is not None:
            yield "", _meta_info(last)

    def select(self, s, choices, temperature, choices_method=None):
        raise NotImplementedError(
            "sgl.select is not supported by the VertexAI backend: generateContent gives "
            "no prompt log-probabilities to score the choices. Use sgl.gen and parse "
            "the answer, or a backend with logprobs (sgl.RuntimeEndpoint)."
        )


__all__ = ["VertexAI"]
