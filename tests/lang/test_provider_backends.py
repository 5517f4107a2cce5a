"""Contract tests of the Anthropic, LiteLLM and VertexAI backends.

Each backend runs on its official SDK, pointed at a fake of the provider on
loopback that speaks the provider's wire format (Anthropic Messages API JSON and
SSE events; OpenAI chat completions, which LiteLLM's ``openai/`` models send to a
custom ``base_url``; Vertex AI's ``generateContent`` / ``streamGenerateContent``
REST, which the SDK uses with ``api_transport="rest"`` and an ``api_endpoint``).
The fake records every request, so the tests check what the backend sent (roles,
system prompt, stop sequences, max tokens, sampling) and how it read the replies.

The SDKs are in the ``test`` extra; a test whose SDK is missing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

import sglbatch as sgl
from sglbatch.lang.ir import SglSamplingParams

pytestmark = [
    # Noise from the SDKs' own imports (litellm's pydantic models, Vertex AI's notice).
    pytest.mark.filterwarnings("ignore::UserWarning:pydantic.*"),
    pytest.mark.filterwarnings("ignore:This feature is deprecated:UserWarning"),
    # Checked in test_anthropic_sampling_params_and_api_version.
    pytest.mark.filterwarnings("ignore:Anthropic API version:UserWarning"),
]

# ---------------------------------------------------------------------------
# The fake provider: one threaded HTTP server on loopback for all three APIs.
# ---------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    """The fake's "tokens": words with their leading whitespace."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


def _complete(reply: str, stops: list[str], max_tokens: int | None):
    """What a provider returns for `reply`: (tokens, reason, matched stop).
    reason is "stop", "stop_sequence" or "length"."""
    reason, matched = "stop", None
    cuts = [(reply.find(x), x) for x in stops if x and x in reply]
    if cuts:
        pos, matched = min(cuts)
        reply, reason = reply[:pos], "stop_sequence"
    tokens = _tokens(reply)
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens, reason, matched = tokens[:max_tokens], "length", None
    return tokens, reason, matched


class FakeProvider:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replies: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def script(self, *replies: str) -> None:
        """The model's next replies, in order (before stop / max_tokens apply)."""
        self.requests.clear()
        self.replies = list(replies)

    def next_reply(self) -> str:
        return self.replies.pop(0) if self.replies else "OK"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(fake: FakeProvider):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            fake.requests.append(
                {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                 "body": body}
            )
            path = self.path.split("?")[0]
            if path.endswith("/messages"):
                self._anthropic(body)
            elif path.endswith("/chat/completions"):
                self._openai(body)
            elif path.endswith(":generateContent"):
                self._gemini(body, stream=False)
            elif path.endswith(":streamGenerateContent"):
                self._gemini(body, stream=True)
            else:
                self._send_json({"error": {"message": f"no route {path}"}}, status=404)

        # -- plumbing --
        def _send_json(self, obj: Any, status: int = 200) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send_stream(self, content_type: str, pieces: Iterator[str]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in pieces:
                data = piece.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        # -- Anthropic Messages API --
        def _anthropic(self, body: dict[str, Any]) -> None:
            tokens, reason, matched = _complete(
                fake.next_reply(), body.get("stop_sequences") or [], body["max_tokens"])
            reason = {"stop": "end_turn"}.get(reason, reason)
            reason = {"length": "max_tokens"}.get(reason, reason)
            usage = {"input_tokens": 21, "output_tokens": len(tokens)}
            message = {"id": "msg_fake", "type": "message", "role": "assistant",
                       "model": body["model"], "content": [], "stop_reason": None,
                       "stop_sequence": None, "usage": {"input_tokens": 21, "output_tokens": 0}}
            if not body.get("stream"):
                message.update(content=[{"type": "text", "text": "".join(tokens)}],
                               stop_reason=reason, stop_sequence=matched, usage=usage)
                return self._send_json(message)

            def events():
                def event(kind: str, data: dict[str, Any]) -> str:
                    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"
                yield event("message_start", {"message": message})
                yield event("content_block_start",
                            {"index": 0, "content_block": {"type": "text", "text": ""}})
                yield event("ping", {})
                for tok in tokens:
                    yield event("content_block_delta",
                                {"index": 0, "delta": {"type": "text_delta", "text": tok}})
                yield event("content_block_stop", {"index": 0})
                yield event("message_delta",
                            {"delta": {"stop_reason": reason, "stop_sequence": matched},
                             "usage": {"output_tokens": len(tokens)}})
                yield event("message_stop", {})
            self._send_stream("text/event-stream", events())

        # -- OpenAI chat completions (LiteLLM's openai/ models) --
        def _openai(self, body: dict[str, Any]) -> None:
            stop = body.get("stop") or []
            stops = [stop] if isinstance(stop, str) else stop
            tokens, reason, _ = _complete(
                fake.next_reply(), stops, body.get("max_tokens") or body.get("max_completion_tokens"))
            reason = "stop" if reason != "length" else "length"
            usage = {"prompt_tokens": 17, "completion_tokens": len(tokens),
                     "total_tokens": 17 + len(tokens)}
            base = {"id": "chatcmpl-fake", "created": 1700000000, "model": body["model"]}
            if not body.get("stream"):
                return self._send_json({
                    **base, "object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "finish_reason": reason,
                                 "message": {"role": "assistant", "content": "".join(tokens)}}]})

            def chunks():
                def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
                    obj = {**base, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                    return f"data: {json.dumps(obj)}\n\n"
                yield chunk({"role": "assistant", "content": ""})
                for tok in tokens:
                    yield chunk({"content": tok})
                yield chunk({}, reason)
                yield "data: [DONE]\n\n"
            self._send_stream("text/event-stream", chunks())

        # -- Vertex AI generateContent REST --
        def _gemini(self, body: dict[str, Any], stream: bool) -> None:
            config = body.get("generationConfig") or body.get("generation_config") or {}
            stops = config.get("stopSequences") or config.get("stop_sequences") or []
            max_tokens = config.get("maxOutputTokens") or config.get("max_output_tokens")
            tokens, reason, _ = _complete(fake.next_reply(), stops, max_tokens)
            reason = "MAX_TOKENS" if reason == "length" else "STOP"
            usage = {"promptTokenCount": 13, "candidatesTokenCount": len(tokens),
                     "totalTokenCount": 13 + len(tokens)}

            def response(text: str | None, finish: str | None) -> dict[str, Any]:
                candidate: dict[str, Any] = {"index": 0}
                if text is not None:
                    candidate["content"] = {"role": "model", "parts": [{"text": text}]}
                if finish:
                    candidate["finishReason"] = finish
                return {"candidates": [candidate], "usageMetadata": usage,
                        "modelVersion": "fake-gemini"}
            if not stream:
                return self._send_json(response("".join(tokens), reason))

            def pieces():  # REST streaming: one JSON array, sent element by element
                objs = [response(tok, None) for tok in tokens]
                objs.append(response(None, reason))  # the last chunk: no text, finish reason
                yield "["
                for i, obj in enumerate(objs):
                    yield ("," if i else "") + json.dumps(obj) + "\r\n"
                yield "]"
            self._send_stream("application/json", pieces())

    return Handler


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    server = FakeProvider()
    yield server
    server.close()


# ---------------------------------------------------------------------------
# The programs run through each backend.
# ---------------------------------------------------------------------------


@sgl.function
def capital(s, country):
    s += sgl.system("You are a terse geography assistant.")
    s += sgl.user(f"What is the capital of {country}?")
    s += sgl.assistant(sgl.gen("answer", max_tokens=16, stop=".", temperature=0.25))


@sgl.function
def two_turns(s):
    s += sgl.system("Answer in one word.")
    s += sgl.user("Largest planet?")
    s += sgl.assistant(sgl.gen("first", max_tokens=8))
    s += sgl.user("And the smallest?")
    s += sgl.assistant(sgl.gen("second", max_tokens=8))


@sgl.function
def no_roles(s):
    s += "Say hi"
    s += sgl.gen("out", max_tokens=4)


@sgl.function
def pick(s):
    s += sgl.user("Pick a color.")
    s += sgl.assistant(sgl.select("color", choices=["red", "blue"]))


def _last_body(fake: FakeProvider) -> dict[str, Any]:
    assert fake.requests, "the backend sent no request"
    return fake.requests[-1]["body"]


def _stream_pieces(backend, fake: FakeProvider, reply: str):
    """What backend.generate_stream yields for `reply` (stop "."), straight."""
    fake.script(reply)
    s = _stub_executor([{"role": "user", "content": "Go"}])
    return list(backend.generate_stream(s, SglSamplingParams(max_new_tokens=16, stop=".")))


def _stub_executor(messages, text="", cur_role=None, cur_role_begin_pos=None):
    """A bare StreamExecutor stand-in, for message-conversion details."""
    return SimpleNamespace(messages_=messages, text_=text, cur_role=cur_role,
                           cur_role_begin_pos=cur_role_begin_pos, cur_images=[])


# ---------------------------------------------------------------------------
# Missing SDK: a clear ImportError naming the extra.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, cls, sdk, extra",
    [("anthropic", "Anthropic", "anthropic", "anthropic"),
     ("litellm", "LiteLLM", "litellm", "litellm"),
     ("vertexai", "VertexAI", "vertexai", "vertexai")],
)
def test_missing_sdk_names_the_extra(monkeypatch, module, cls, sdk, extra):
    import importlib
    import sys

    mod = importlib.import_module(f"sglbatch.lang.backend.{module}")
    monkeypatch.setitem(sys.modules, sdk, None)  # makes `import sdk` raise ImportError
    with pytest.raises(ImportError, match=re.escape(f'pip install "sglbatch[{extra}]"')):
        getattr(mod, cls)("some-model")


def test_backend_modules_import_without_sdks():
    """Importing sglbatch.lang.backend (and these modules) loads no SDK."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import sglbatch.lang.backend as b\n"
        "import sglbatch.lang.backend.anthropic, sglbatch.lang.backend.litellm, "
        "sglbatch.lang.backend.vertexai\n"
        "print(sorted(m for m in ('anthropic', 'litellm', 'vertexai') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------


@pytest.fixture
def anthropic_backend(fake):
    pytest.importorskip("anthropic")
    from sglbatch.lang.backend.anthropic import Anthropic

    return Anthropic("claude-fake", api_key="sk-ant-test", base_url=fake.url, max_retries=0)


def test_anthropic_generate(fake, anthropic_backend):
    fake.script("Paris. It has been the capital since 987.")
    state = capital.run(country="France", backend=anthropic_backend)
    assert state["answer"] == "Paris"

    body = _last_body(fake)
    assert fake.requests[-1]["path"] == "/v1/messages"
    assert body["model"] == "claude-fake"
    # the system prompt goes to `system`, not into the messages
    assert body["system"] == "You are a terse geography assistant."
    assert body["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert body["stop_sequences"] == ["."]
    assert body["max_tokens"] == 16
    assert "stream" not in body or body["stream"] is False
    # the program's messages keep their system message
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]
    assert state.messages()[-1]["content"] == "Paris"

    meta = state.get_meta_info("answer")
    assert meta["finish_reason"] == {"type": "stop", "matched": ".", "stop_reason": "stop_sequence"}
    assert meta["prompt_tokens"] == 21 and meta["completion_tokens"] == 1


def test_anthropic_sampling_params_and_api_version(fake, anthropic_backend):
    """anthropic>=2 speaks API 2026-10-21, which rejects temperature/top_p/top_k:
    they are left out (with a warning); with an older pinned API version,
    non-default ones go in the body."""

    fake.script("Paris.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capital.run(country="France", backend=anthropic_backend).sync()
    version = fake.requests[-1]["headers"]["anthropic-version"]
    body = _last_body(fake)
    if version >= "2026-10-21":
        assert not {"temperature", "top_p", "top_k"} & set(body)
        assert any("sampling parameters" in str(w.message) for w in caught)
    else:  # an SDK older than 2.0
        assert body["temperature"] == 0.25

    from sglbatch.lang.backend.anthropic import Anthropic

    old = Anthropic("claude-fake", api_key="sk-ant-test", base_url=fake.url, max_retries=0,
                    default_headers={"anthropic-version": "2023-06-01"})
    fake.script("Paris.")
    capital.run(country="France", backend=old).sync()
    assert fake.requests[-1]["headers"]["anthropic-version"] == "2023-06-01"
    body = _last_body(fake)
    assert body["temperature"] == 0.25
    assert "top_p" not in body and "top_k" not in body  # defaults are not sent
    fake.script("Paris.")
    capital.run(country="France", backend=old, top_p=0.5, top_k=7).sync()
    body = _last_body(fake)
    assert (body["top_p"], body["top_k"]) == (0.5, 7)


def test_anthropic_stream(fake, anthropic_backend):
    fake.script("Paris is the capital. Lyon is not.")
    state = capital.run(country="France", backend=anthropic_backend, stream=True)
    pieces = list(state.text_iter("answer"))
    assert "".join(pieces) == "Paris is the capital"
    assert state["answer"] == "Paris is the capital"
    body = _last_body(fake)
    assert body["stream"] is True
    assert body["system"] == "You are a terse geography assistant."
    assert body["stop_sequences"] == ["."] and body["max_tokens"] == 16
    meta = state.get_meta_info("answer")
    assert meta["finish_reason"]["matched"] == "."
    assert meta["completion_tokens"] == 4
    # one piece per streamed delta, then an empty piece carrying the meta_info
    pieces = _stream_pieces(anthropic_backend, fake, "Paris is the capital. Lyon is not.")
    assert [text for text, _ in pieces] == ["Paris", " is", " the", " capital", ""]
    assert pieces[-1][1]["completion_tokens"] == 4


def test_anthropic_multi_turn_and_max_tokens(fake, anthropic_backend):
    fake.script("Jupiter", "Mercury is the smallest planet of all eight planets here")
    state = two_turns.run(backend=anthropic_backend)
    assert state["first"] == "Jupiter"
    assert state["second"] == "Mercury is the smallest planet of all eight"  # max_tokens=8
    first, second = (r["body"] for r in fake.requests)
    assert first["messages"] == [{"role": "user", "content": "Largest planet?"}]
    assert second["messages"] == [
        {"role": "user", "content": "Largest planet?"},
        {"role": "assistant", "content": "Jupiter"},
        {"role": "user", "content": "And the smallest?"},
    ]
    assert second["system"] == "Answer in one word." and second["max_tokens"] == 8
    assert "stop_sequences" not in second  # no stop given: none sent
    assert state.get_meta_info("second")["finish_reason"] == {"type": "length", "length": 8}


def test_anthropic_no_roles_and_length(fake, anthropic_backend):
    fake.script("hello there my dear friend")
    state = no_roles.run(backend=anthropic_backend)
    assert state["out"] == "hello there my dear"
    body = _last_body(fake)
    assert body["messages"] == [{"role": "user", "content": "Say hi"}]
    assert "system" not in body
    assert state.get_meta_info("out")["finish_reason"] == {"type": "length", "length": 4}


def test_anthropic_prefill_and_images(fake, anthropic_backend):
    """Text before gen in the open assistant turn is sent as a prefill; OpenAI
    image parts become Anthropic image blocks."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]},
    ]
    text = "Be brief.\n\nHuman: What is this?\n\nAssistant: It is "
    s = _stub_executor(messages, text, "assistant", len(text) - len(" It is "))
    fake.script(" a cat.")
    out, _ = anthropic_backend.generate(s, SglSamplingParams(max_new_tokens=5, stop="."))
    assert out == "a cat"  # the prefill's trailing space is not doubled
    body = _last_body(fake)
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
    ]
    assert body["messages"][-1] == {"role": "assistant", "content": "It is"}
    assert messages[0]["role"] == "system"  # the executor's messages are untouched


@sgl.function
def prefilled(s):
    s += sgl.user("Capital of Italy?")
    s += sgl.assistant("The capital is " + sgl.gen("city", max_tokens=4, stop="."))


def test_anthropic_prefill_in_program(fake, anthropic_backend):
    fake.script(" Rome. Next question?")
    state = prefilled.run(backend=anthropic_backend)
    assert state["city"] == "Rome"
    assert state.messages()[-1] == {"role": "assistant", "content": "The capital is Rome"}
    assert _last_body(fake)["messages"] == [
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "The capital is"},
    ]


def test_anthropic_select_is_not_supported(fake, anthropic_backend):
    fake.script()
    with pytest.raises(NotImplementedError, match="not supported by the Anthropic backend"):
        pick.run(backend=anthropic_backend)["color"]
    assert not fake.requests


# ---------------------------------------------------------------------------
# LiteLLM (an OpenAI-compatible server through the openai/ provider)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _litellm_module():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    return pytest.importorskip("litellm")


@pytest.fixture
def litellm_backend(fake, _litellm_module):
    from sglbatch.lang.backend.litellm import LiteLLM

    return LiteLLM("openai/fake-model", api_key="sk-test", base_url=fake.url + "/v1",
                   max_retries=0, timeout=30, default_headers={"X-Test": "sgl"})


def test_litellm_generate(fake, litellm_backend):
    fake.script("Paris. It has been the capital since 987.")
    state = capital.run(country="France", backend=litellm_backend)
    assert state["answer"] == "Paris"
    req = fake.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-test"
    assert req["headers"]["x-test"] == "sgl"
    body = req["body"]
    assert body["model"] == "fake-model"
    assert body["messages"] == [
        {"role": "system", "content": "You are a terse geography assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert body["stop"] in (".", ["."])
    assert body["max_tokens"] == 16
    assert body["temperature"] == 0.25
    # no-op defaults are not sent
    assert not {"top_p", "frequency_penalty", "presence_penalty"} & set(body)
    meta = state.get_meta_info("answer")
    assert meta["finish_reason"]["type"] == "stop"
    assert meta["prompt_tokens"] == 17 and meta["completion_tokens"] == 1


def test_litellm_stream(fake, litellm_backend):
    fake.script("Paris is the capital. Lyon is not.")
    state = capital.run(country="France", backend=litellm_backend, stream=True)
    pieces = list(state.text_iter("answer"))
    assert "".join(pieces) == "Paris is the capital"
    body = _last_body(fake)
    assert body["stream"] is True and body["stop"] in (".", ["."])
    assert body["max_tokens"] == 16
    # one piece per streamed delta, then an empty piece carrying the meta_info
    pieces = _stream_pieces(litellm_backend, fake, "Paris is the capital. Lyon is not.")
    assert [text for text, _ in pieces] == ["Paris", " is", " the", " capital", ""]
    assert pieces[-1][1]["finish_reason"]["type"] == "stop"


def test_litellm_multi_turn_and_length(fake, litellm_backend):
    fake.script("Jupiter", "Mercury is the smallest planet of all eight planets here")
    state = two_turns.run(backend=litellm_backend, top_p=0.5, frequency_penalty=0.1)
    assert state["first"] == "Jupiter"
    assert state["second"] == "Mercury is the smallest planet of all eight"
    second = fake.requests[-1]["body"]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"] == "Jupiter"
    assert second["top_p"] == 0.5 and second["frequency_penalty"] == 0.1
    assert "stop" not in second
    assert state.get_meta_info("second")["finish_reason"] == {"type": "length", "length": 8}


def test_litellm_select_is_not_supported(fake, litellm_backend):
    fake.script()
    with pytest.raises(NotImplementedError, match="not supported by the LiteLLM backend"):
        pick.run(backend=litellm_backend)["color"]
    assert not fake.requests


# ---------------------------------------------------------------------------
# Vertex AI (REST transport pointed at the fake)
# ---------------------------------------------------------------------------


@pytest.fixture
def vertexai_backend(fake, monkeypatch):
    vertexai = pytest.importorskip("vertexai")
    pytest.importorskip("vertexai.generative_models")
    from google.auth.credentials import AnonymousCredentials

    monkeypatch.delenv("GCP_PROJECT_ID", raising=False)
    vertexai.init(project="sgl-test", location="us-central1", api_endpoint=fake.url,
                  api_transport="rest", credentials=AnonymousCredentials())
    from sglbatch.lang.backend.vertexai import VertexAI

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SDK's deprecation notice
        yield VertexAI("gemini-fake")


def _gemini_parts(content: dict[str, Any]) -> list[str]:
    return [p["text"] for p in content["parts"]]


def test_vertexai_generate(fake, vertexai_backend):
    fake.script("Paris. It has been the capital since 987.")
    state = capital.run(country="France", backend=vertexai_backend)
    assert state["answer"] == "Paris"
    req = fake.requests[-1]
    assert req["path"].split("?")[0] == (
        "/v1/projects/sgl-test/locations/us-central1/publishers/google/models/"
        "gemini-fake:generateContent")
    body = req["body"]
    assert _gemini_parts(body["systemInstruction"]) == ["You are a terse geography assistant."]
    assert [c["role"] for c in body["contents"]] == ["user"]
    assert _gemini_parts(body["contents"][0]) == ["What is the capital of France?"]
    config = body["generationConfig"]
    assert config["stopSequences"] == ["."]
    assert config["maxOutputTokens"] == 16
    assert config["temperature"] == 0.25
    assert config["candidateCount"] == 1
    assert "topK" not in config
    meta = state.get_meta_info("answer")
    assert meta["finish_reason"]["type"] == "stop"
    assert meta["prompt_tokens"] == 13 and meta["completion_tokens"] == 1


def test_vertexai_stream(fake, vertexai_backend):
    fake.script("Paris is the capital. Lyon is not.")
    state = capital.run(country="France", backend=vertexai_backend, stream=True)
    pieces = list(state.text_iter("answer"))
    assert "".join(pieces) == "Paris is the capital"
    assert fake.requests[-1]["path"].split("?")[0].endswith(":streamGenerateContent")
    body = _last_body(fake)
    assert body["generationConfig"]["stopSequences"] == ["."]
    assert state.get_meta_info("answer")["completion_tokens"] == 4
    # one piece per streamed delta, then an empty piece carrying the meta_info
    pieces = _stream_pieces(vertexai_backend, fake, "Paris is the capital. Lyon is not.")
    assert [text for text, _ in pieces] == ["Paris", " is", " the", " capital", ""]
    assert pieces[-1][1]["completion_tokens"] == 4


def test_vertexai_multi_turn_and_length(fake, vertexai_backend):
    fake.script("Jupiter", "Mercury is the smallest planet of all eight planets here")
    state = two_turns.run(backend=vertexai_backend, top_k=5)
    assert state["first"] == "Jupiter"
    assert state["second"] == "Mercury is the smallest planet of all eight"
    second = _last_body(fake)
    assert [c["role"] for c in second["contents"]] == ["user", "model", "user"]
    assert _gemini_parts(second["contents"][1]) == ["Jupiter"]
    assert _gemini_parts(second["systemInstruction"]) == ["Answer in one word."]
    assert second["generationConfig"]["topK"] == 5
    assert "stopSequences" not in second["generationConfig"]
    assert state.get_meta_info("second")["finish_reason"] == {"type": "length", "length": 8}


def test_vertexai_no_roles_and_images(fake, vertexai_backend):
    fake.script("hi")
    state = no_roles.run(backend=vertexai_backend)
    assert state["out"] == "hi"
    body = _last_body(fake)
    assert "systemInstruction" not in body
    assert _gemini_parts(body["contents"][0]) == ["Say hi"]

    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]}]
    fake.script("A cat.")
    out, _ = vertexai_backend.generate(_stub_executor(messages), SglSamplingParams())
    assert out == "A cat."
    parts = _last_body(fake)["contents"][0]["parts"]
    assert parts[0] == {"text": "What is this?"}
    inline = parts[1].get("inlineData") or parts[1].get("inline_data")
    assert inline["mimeType"] == "image/png" and inline["data"] == "iVBORw0KGgo="


def test_vertexai_select_is_not_supported(fake, vertexai_backend):
    fake.script()
    with pytest.raises(NotImplementedError, match="not supported by the VertexAI backend"):
        pick.run(backend=vertexai_backend)["color"]
    assert not fake.requests
