"""`sglbatch serve`'s own arguments (the engine's are EngineConfig); the CLI's flags and
Runtime's keyword arguments are generated from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerArgs:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=30000, metadata={"help": "port to listen on"})
    api_key: str | None = field(default=None, metadata={
        "help": "require `Authorization: Bearer KEY` on every route but /health"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model's name in the API (default: --model-path)"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a Jinja chat template (file or text) instead of the tokenizer's"})
    tool_call_parser: str = field(default="qwen25", metadata={
        "help": "how tool calls in the output are written: qwen25 | llama3"})
    data_dir: str = field(default="sglbatch-data", metadata={
        "help": "where /v1/files and /v1/batches keep their files and state"})
    max_upload_mb: float = field(default=512.0, metadata={
        "help": "largest accepted file upload, in MB"})
    is_embedding: bool = field(default=False, metadata={
        "help": "serve an embedding model (/v1/embeddings, /encode), e.g. "
                "--model-path all-minilm-l6-v2"})
