"""`sglbatch serve`: load the model, then serve HTTP with uvicorn until SIGINT/SIGTERM, which
stop new connections, let running requests finish, and shut the engine down."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import uvicorn

from sglbatch.server.app import create_app
from sglbatch.server.args import ServerArgs
from sglbatch.server.state import ServerState

logger = logging.getLogger(__name__)


def load_state(args: ServerArgs, engine_kwargs: dict[str, Any]) -> ServerState:
    model_path = engine_kwargs["model_path"]
    name = args.served_model_name or model_path
    if args.is_embedding:
        from sglbatch.engine.embedding import EmbeddingModel

        return ServerState(args, name, model_path, embedder=EmbeddingModel(model_path))
    from sglbatch.engine.engine import Engine

    engine = Engine(**engine_kwargs)
    return ServerState(args, name, model_path, engine=engine, engine_config=engine.config,
                       chat_template=_read_chat_template(args.chat_template))


def _read_chat_template(value: str | None) -> str | None:
    """--chat-template takes a Jinja file or the template itself."""
    if value is None:
        return None
    path = Path(value)
    if path.suffix in (".jinja", ".j2", ".txt") or path.is_file():
        if not path.is_file():
            raise ValueError(f"--chat-template: no file {value!r}")
        return path.read_text()
    if "{%" not in value and "{{" not in value:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    return value


class _Server(uvicorn.Server):
    """Says where it listens once the socket is bound (tests and scripts wait for it)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            url = f"http://{self.config.host}:{self.config.port}"
            print(f"sglbatch serving {self.state.model_name} at {url} "
                  f"(OpenAI API at {url}/v1)", flush=True)

    async def shutdown(self, sockets: Any = None) -> None:
        # After draining, uvicorn re-raises SIGTERM/SIGINT (the process dies inside
        # asyncio.run), so the engine is stopped here rather than after serve() returns.
        await super().shutdown(sockets)
        _close(self.state)


def _close(state: ServerState) -> None:
    if state.engine is not None:
        state.engine.shutdown()
    state.embed_executor.shutdown(wait=False)


def serve(args: ServerArgs, engine_kwargs: dict[str, Any]) -> None:
    state = load_state(args, engine_kwargs)
    app = create_app(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=30)
    try:
        asyncio.run(_Server(config, state).serve())
    finally:
        _close(state)  # idempotent; covers a failed start
