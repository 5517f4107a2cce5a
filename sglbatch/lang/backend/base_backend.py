"""The backend interface of the frontend language (SGLang-compatible).

The interpreter (``StreamExecutor``) calls these methods; a backend reads the
executor's state: ``s.text_`` (the prompt so far), ``s.messages_`` (chat
messages, for chat APIs), ``s.cur_role``, ``s.images_``, ``s.chat_template``,
``s.sid``, ``s.default_sampling_para``, ``s.backend``, ``s.variables``,
``s.meta_info``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sglbatch.lang.chat_template import get_chat_template
from sglbatch.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglbatch.lang.ir import SglSamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from sglbatch.lang.interpreter import StreamExecutor


class BaseBackend:
    def __init__(self) -> None:
        # True if the backend can join KV caches of forks (SGLang's
        # concatenate_and_append); none of the sglbatch backends does.
        self.support_concate_and_append = False
        self.chat_template = get_chat_template("default")

    def get_model_name(self) -> str:
        raise NotImplementedError()

    def get_chat_template(self):
        return self.chat_template

    def cache_prefix(self, prefix_str: str) -> None:
        pass

    def uncache_prefix(self, rid: str) -> None:
        pass

    def end_request(self, rid: str | list[str]) -> None:
        pass

    def begin_program(self, s: StreamExecutor) -> None:
        pass

    def end_program(self, s: StreamExecutor | list[StreamExecutor]) -> None:
        pass

    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        pass

    def fork_program(
        self,
        src: StreamExecutor,
        dst: list[StreamExecutor],
        position_ids_offset: list[int] | None = None,
    ) -> None:
        pass

    def fill_image(self, s: StreamExecutor) -> None:
        pass

    def generate(
        self,
        s: StreamExecutor,
        sampling_params: SglSamplingParams,
    ) -> tuple[Any, dict[str, Any]]:
        """Continue ``s.text_`` (or ``s.messages_``); returns (text, meta_info).
        With sampling_params.n > 1 an API backend may return a list of texts."""
        raise NotImplementedError()

    def generate_stream(
        self,
        s: StreamExecutor,
        sampling_params: SglSamplingParams,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yields (text_delta, meta_info) pairs."""
        raise NotImplementedError()

    def select(
        self,
        s: StreamExecutor,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod | None = None,
    ) -> ChoicesDecision:
        raise NotImplementedError()

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        raise NotImplementedError()

    def shutdown(self) -> None:
        pass

    def flush_cache(self):
        pass

    def get_server_info(self):
        pass


__all__ = ["BaseBackend"]
