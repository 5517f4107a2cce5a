"""What every route shares: the engine (or embedding model), the server's arguments, and
helpers for running engine calls from the event loop."""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sglbatch.server.errors import APIError


@dataclass
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None  # a Jinja file or template text; default: the tokenizer's
    tool_call_parser: str = "qwen25"
    data_dir: str = "sglbatch-data"
    max_upload_mb: float = 512.0
    is_embedding: bool = False


@dataclass
class ServerState:
    args: ServerArgs
    model_name: str
    model_path: str
    engine: Any = None  # sglbatch.Engine for generation models
    embedder: Any = None  # sglbatch.engine.embedding.EmbeddingModel with --is-embedding
    engine_config: Any = None
    chat_template: str | None = None  # the --chat-template text, when given
    started: float = field(default_factory=time.time)
    # Embedding forward passes run here: one thread keeps torch's OpenMP team on one caller.
    embed_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="sglbatch-embed"))
    batches: Any = None  # sglbatch.server.batches.BatchRunner, set at startup

    @property
    def max_model_len(self) -> int:
        if self.engine is not None:
            return self.engine.model_runner.context_len
        return self.embedder.max_seq_length

    def check_model(self, model: str | None) -> None:
        """OpenAI routes name a model; only the served one (or its path) exists here."""
        if model is not None and model not in (self.model_name, self.model_path):
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}` (see /v1/models).", "model",
                           "model_not_found")

    def require_generation(self) -> Any:
        if self.engine is None:
            raise APIError(400, "this server runs an embedding model (--is-embedding); "
                                "use /v1/embeddings or /encode")
        return self.engine

    def require_embedding(self) -> Any:
        if self.embedder is None:
            raise APIError(400, "this server runs a generation model; start it with "
                                "--is-embedding and an embedding model for embeddings")
        return self.embedder

    async def embed(self, inputs: list) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        # Too long is an error, as OpenAI's API answers, not a silent truncation.
        return await loop.run_in_executor(
            self.embed_executor, functools.partial(self.embedder.encode, truncate=False), inputs)
