"""From a recorded token to the caller: the one place that decides a request is finished
(length, EOS, stop tokens, stop strings, a grammar rejection), detokenizes incrementally,
streams deltas that never have to be retracted, and sends SGLang-shaped outputs. The
scheduler records tokens and releases finished requests; it decides no finish itself."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sglbatch.engine.api_types import FinishReason, GenerateOutput, MetaInfo, Sink
from sglbatch.engine.logprobs import meta_info_fields
from sglbatch.engine.request import Req
from sglbatch.engine.stats import EngineStats
from sglbatch.engine.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop_string

logger = logging.getLogger(__name__)



@dataclass(eq=False)
class TrackedRequest:
    """One request on its way out: where its outputs go, what was already sent."""

    req: Req
    index: int  # within the caller's generate() call
    sink: Sink
    stream: bool
    detok: IncrementalDetokenizer
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    sent_chars: int = 0
    sent_ids: int = 0
    # Text is needed token by token (streaming, stop strings), not only at finish.
    needs_live_text: bool = field(init=False)

    def __post_init__(self) -> None:
        self.needs_live_text = self.stream or bool(self.req.sampling_params.stop)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...],
                 stats: EngineStats):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.stats = stats

    def on_step(self, tracked: TrackedRequest) -> None:
        """The scheduler recorded this request's new token (or, for max_new_tokens=0, its
        prefill): decide whether it is finished, and stream what is safe to send."""
        req = tracked.req
        if tracked.first_token_at is None and req.output_ids:
            tracked.first_token_at = time.perf_counter()
            self.stats.on_first_token(tracked.first_token_at - tracked.created)
        if req.finish_reason is None:
            req.finish_reason = self._token_finish(req)
        if not tracked.needs_live_text or not req.output_ids:
            return  # detokenized once at finish
        delta = tracked.detok.append(_visible_ids(req, req.output_ids[-1:]))
        stops = req.sampling_params.stop
        if delta and stops and not req.is_finished:
            match = find_stop_string(tracked.detok.text, stops, len(delta))
            if match is not None:
                idx, stop = match
                end = idx + len(stop) if req.sampling_params.no_stop_trim else idx
                tracked.detok.text = tracked.detok.text[:end]
                req.finish_reason = FinishReason.stop(stop)
        if tracked.stream and not req.is_finished:
            # Hold back a possible stop-string prefix so streamed text never has to be retracted.
            hold = max((len(s) for s in stops), default=1) - 1
            self._emit(tracked, visible_chars=len(tracked.detok.text) - hold)

    def _token_finish(self, req: Req) -> FinishReason | None:
        params = req.sampling_params
        if not req.output_ids:  # max_new_tokens=0: the prefill was all it asked for
            return FinishReason.max_length(0)
        token = req.output_ids[-1]
        if req.grammar is not None and not req.grammar.accept(token):
            # The mask only allows tokens the grammar accepts, so this is an engine bug.
            return FinishReason.abort(f"the grammar rejected token {token}")
        if len(req.output_ids) >= params.max_new_tokens:
            return FinishReason.max_length(len(req.output_ids))
        if (token in self.eos_token_ids and not params.ignore_eos) or \
                token in params.stop_token_ids:
            return FinishReason.stop(token)
        return None

    def finish(self, tracked: TrackedRequest) -> None:
        """Send a finished (or aborted) request's final output."""
        req, detok = tracked.req, tracked.detok
        if not tracked.needs_live_text:
            detok.append(_visible_ids(req, req.output_ids))
        if req.finish_reason is None or req.finish_reason.kind != "stop" or \
                not isinstance(req.finish_reason.matched, str):
            detok.flush()
        self._emit(tracked, visible_chars=len(detok.text))
        ttft = None if tracked.first_token_at is None else tracked.first_token_at - tracked.created
        self.stats.on_finish(
            len(req.input_ids), req.cached_tokens, len(req.output_ids),
            time.perf_counter() - tracked.created, ttft,
            aborted=req.finish_reason is not None and req.finish_reason.kind == "abort")

    def send_error(self, tracked: TrackedRequest, reason: FinishReason) -> None:
        """Finish a request that an engine failure took down. Built from plain fields only:
        this runs when the usual output path may be what broke."""
        req = tracked.req
        req.finish_reason = reason
        self.stats.on_finish(len(req.input_ids), req.cached_tokens, len(req.output_ids),
                             time.perf_counter() - tracked.created, None, aborted=True)
        _deliver(tracked, GenerateOutput("", [], MetaInfo(
            req.rid, reason, prompt_tokens=len(req.input_ids),
            completion_tokens=len(req.output_ids), cached_tokens=req.cached_tokens,
            e2e_latency=time.perf_counter() - tracked.created)))

    def _emit(self, tracked: TrackedRequest, visible_chars: int) -> None:
        req = tracked.req
        sent_ids = tracked.sent_ids if tracked.stream else 0
        if tracked.stream:
            text = tracked.detok.text[tracked.sent_chars:max(visible_chars, tracked.sent_chars)]
            ids = req.output_ids[tracked.sent_ids:]
            if not text and not ids and not req.is_finished:
                return
            tracked.sent_chars += len(text)
            tracked.sent_ids = len(req.output_ids)
        else:
            text, ids = tracked.detok.text, list(req.output_ids)
        _deliver(tracked, GenerateOutput(text, ids, self._meta_info(tracked, sent_ids)))

    def _meta_info(self, tracked: TrackedRequest, output_from: int) -> MetaInfo:
        req = tracked.req
        logprobs = {} if req.logprob_options is None else meta_info_fields(
            req.logprob_options, req.logprobs, output_from, self._token_text)
        return MetaInfo(req.rid, req.finish_reason, prompt_tokens=len(req.input_ids),
                        completion_tokens=len(req.output_ids), cached_tokens=req.cached_tokens,
                        e2e_latency=time.perf_counter() - tracked.created, logprobs=logprobs)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _deliver(tracked: TrackedRequest, output: GenerateOutput) -> None:
    try:
        tracked.sink(tracked.index, output)
    except Exception:  # e.g. the caller's event loop is gone: its loss, nobody else's
        logger.exception("delivering an output of %s failed", tracked.req.rid)


def _visible_ids(req: Req, ids: list[int]) -> list[int]:
    """`ids` (the tail of the output) without a matched stop token at the very end: as
    SGLang, it stays in output_ids but not in the text, unless no_stop_trim."""
    reason = req.finish_reason
    if reason is not None and reason.kind == "stop" and isinstance(reason.matched, int) \
            and not req.sampling_params.no_stop_trim and ids:
        return ids[:-1]
    return ids
