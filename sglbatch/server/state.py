"""What every route shares: the engine (or embedding model), the server's arguments, and
helpers for running engine calls from the event loop."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sglbatch.server.args import ServerArgs
from sglbatch.server.errors import APIError
from sglbatch.server.store import Store

if TYPE_CHECKING:  # annotations only: these import torch, or import this module
    from sglbatch.engine.config import EngineConfig
    from sglbatch.engine.embedding import EmbeddingModel
    from sglbatch.engine.engine import Engine
    from sglbatch.server.batches import BatchRunner

T = TypeVar("T")


@dataclass
class ServerState:
    args: ServerArgs
    model_name: str
    model_path: str
    engine: Engine | None = None  # generation models
    embedder: EmbeddingModel | None = None  # with --is-embedding
    engine_config: EngineConfig | None = None
    chat_template: str | None = None  # the --chat-template text, when given
    started: float = field(default_factory=time.time)
    # Embedding forward passes run here: one thread keeps torch's OpenMP team on one caller.
    embed_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="sglbatch-embed"))
    # Opened at startup (batches.lifespan), closed at shutdown.
    store: Store | None = None
    batches: BatchRunner | None = None

    @property
    def max_model_len(self) -> int:
        if self.engine is not None:
            return self.engine.info.context_len
        return self.embedder.max_seq_length

    def check_model(self, model: str | None) -> None:
        """OpenAI routes name a model; only the served one (or its path) exists here."""
        if model is not None and model not in (self.model_name, self.model_path):
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}` (see /v1/models).", "model",
                           "model_not_found")

    def require_store(self) -> Store:
        if self.store is None:
            raise APIError(503, "the file and batch store is not open: the server is starting "
                                "or stopping; retry")
        return self.store

    def require_batches(self) -> BatchRunner:
        if self.batches is None:
            raise APIError(503, "the batch runner is not running: the server is starting or "
                                "stopping; retry")
        return self.batches

    async def call_store(self, method: Callable[..., T], *args: Any) -> T:
        """`await state.call_store(Store.get_file, file_id)`: on the store's own thread."""
        store = self.require_store()
        return await store.call(method, store, *args)

    def require_generation(self) -> Engine:
        if self.engine is None:
            raise APIError(400, "this server runs an embedding model (--is-embedding); "
                                "use /v1/embeddings or /encode")
        return self.engine

    def require_embedding(self) -> EmbeddingModel:
        if self.embedder is None:
            raise APIError(400, "this server runs a generation model; start it with "
                                "--is-embedding and an embedding model for embeddings")
        return self.embedder

    async def embed(self, inputs: list) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        # Too long is an error, as OpenAI's API answers, not a silent truncation.
        return await loop.run_in_executor(
            self.embed_executor, functools.partial(self.embedder.encode, truncate=False), inputs)
