"""What the interpreter does with each kind of expression: a handler per expression class,
run in order by the program's StreamExecutor (a mixin of it: the handlers read and write the
executor's text, messages, variables and events, and call its backend)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

from sglbatch.lang.global_config import global_config
from sglbatch.lang.ir import (
    SglCommitLazy,
    SglConcateAndAppend,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglGen,
    SglImage,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    SglSeparateReasoning,
    SglVariable,
    SglVarScopeBegin,
    SglVarScopeEnd,
    SglVideo,
)
from sglbatch.lang.media import encode_image_base64
from sglbatch.lang.reasoning import split_reasoning


class ExpressionHandlers:
    """StreamExecutor's handlers: `_execute` runs an expression (in the executor's queue
    order) with the handler of its class."""

    def _execute(self, other):
        if isinstance(other, str):
            other = SglConstantText(other)
        assert isinstance(other, SglExpr), f"{other}"
        # The handler of the expression's class, or of the nearest base class that has one.
        handler = next((_EXPR_HANDLERS[cls] for cls in type(other).__mro__
                        if cls in _EXPR_HANDLERS), None)
        if handler is None:
            raise ValueError(f"Unknown type: {type(other)}")  # ValueError, as SGLang
        handler(self, other)

    def _execute_constant_text(self, expr: SglConstantText) -> None:
        self._execute_fill(expr.value)

    def _execute_expr_list(self, expr: SglExprList) -> None:
        for x in expr.expr_list:
            self._execute(x)

    def _execute_concate_and_append(self, expr: SglConcateAndAppend) -> None:
        if global_config.enable_parallel_encoding and self.backend.support_concate_and_append:
            self._execute_concatenate_and_append_kv_cache(expr)
        else:
            self._execute_concatenate_and_append_text(expr)

    def _execute_fill(self, value: str, prefix=False):
        value = str(value)
        if (
            self.cur_role == "assistant"
            and self.num_api_spec_tokens is not None
            and getattr(self.backend, "is_chat_model", False)
            and not prefix
        ):
            self.backend.spec_fill(value)
            return
        if self.speculated_text.startswith(value):
            self.speculated_text = self.speculated_text[len(value) :]
        else:
            self.speculated_text = ""
        self.text_ += value

    def _execute_image(self, expr: SglImage):
        data = encode_image_base64(expr.path)
        path = expr.path if isinstance(expr.path, str) else "<image>"
        self.images_.append((path, data))
        self.cur_images.append((path, data))
        self.text_ += self.chat_template.image_token

    def _execute_video(self, expr: SglVideo):
        encode = getattr(self.backend, "encode_video_base64", None)
        if encode is None:
            raise NotImplementedError(
                "sgl.video(): this backend does not take video input "
                "(sglbatch.lang has no frame extractor)"
            )
        data = encode(expr.path, expr.num_frames)
        self.images_.append((expr.path, data))
        self.cur_images.append((expr.path, data))
        self.text_ += self.chat_template.image_token

    def _spec_gen(self, sampling_params):
        stop = sampling_params.stop
        max_new_tokens = sampling_params.max_new_tokens
        meta_info = {}

        def regen():
            nonlocal meta_info
            sampling_params.max_new_tokens = max(
                sampling_params.max_new_tokens, self.num_api_spec_tokens
            )
            sampling_params.stop = None
            self.speculated_text, meta_info = self.backend.generate(
                self, sampling_params=sampling_params
            )

        def find_stop():
            stops = [stop] if isinstance(stop, str) else list(stop)
            positions = [p for p in (self.speculated_text.find(x) for x in stops) if p != -1]
            return min(positions) if positions else -1

        if stop is None:
            if len(self.speculated_text) < max_new_tokens:
                regen()
            comp = self.speculated_text[:max_new_tokens]
            self.speculated_text = self.speculated_text[max_new_tokens:]
        elif isinstance(stop, (str, list, tuple)):
            if self.speculated_text == "":
                regen()
            stop_pos = find_stop()
            if stop_pos == -1:
                stop_pos = min(sampling_params.max_new_tokens, len(self.speculated_text))
            comp = self.speculated_text[:stop_pos]
            self.speculated_text = self.speculated_text[stop_pos:]
        else:
            raise ValueError("Wrong type of stop in sampling parameters.")
        return comp, meta_info

    def _execute_gen(self, expr: SglGen):
        sampling_params = self._resolve_sampling_params(expr.sampling_params)
        name = expr.name
        if not self.stream:
            if self.num_api_spec_tokens is None:
                comp, meta_info = self.backend.generate(self, sampling_params=sampling_params)
            elif getattr(self.backend, "is_chat_model", False):
                # Chat-only API: the calls are stored and run at the role's end.
                self.backend.generate(
                    self, sampling_params=sampling_params, spec_var_name=name
                )
                return
            else:
                comp, meta_info = self._spec_gen(sampling_params)

            if isinstance(comp, list):
                self.text_ += comp[0]
            else:
                assert isinstance(comp, str), f"backend returned {type(comp).__name__}"
                self.text_ += comp
            self.variables[name] = comp
            self.meta_info[name] = meta_info
            self.variable_event[name].set()
        else:
            if self.num_api_spec_tokens is not None:
                raise ValueError("stream is not supported with API speculative execution")
            generator = self.backend.generate_stream(self, sampling_params=sampling_params)
            self.variables[name] = ""
            self.stream_var_event[name].set()
            for comp, meta_info in generator:
                self.text_ += comp
                self.variables[name] += comp
                self.meta_info[name] = meta_info
                self.stream_var_event[name].set()
                self.stream_text_event.set()
            self.variable_event[name].set()
            self.stream_var_event[name].set()

    def _execute_select(self, expr: SglSelect):
        decision = self.backend.select(self, expr.choices, expr.temperature, expr.choices_method)
        if expr.name is not None:
            name = expr.name
            self.variables[name] = decision.decision
            self.meta_info[name] = decision.meta_info
            self.variable_event[name].set()
            if self.stream_var_event:
                self.stream_var_event[name].set()
        self.text_ += decision.decision

    def _execute_variable(self, expr: SglVariable):
        src_executor = expr.source_stream_executor
        self._execute_fill(src_executor.get_var(expr.name))

    def _execute_role_begin(self, expr: SglRoleBegin):
        if self.cur_role is not None:
            raise AssertionError(
                f"Nested roles are not allowed (role {expr.role!r} inside {self.cur_role!r})."
            )
        if len(self.messages_) == 0 and expr.role != "system":
            default_system = self.chat_template.default_system_prompt
            if default_system:
                self._execute_role_begin(SglRoleBegin("system"))
                self._execute_fill(default_system)
                self._execute_role_end(SglRoleEnd("system"))

        self.cur_role = expr.role
        prefix, _ = self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)
        self._execute_fill(prefix, prefix=True)
        self.cur_role_begin_pos = len(self.text_)

    def _execute_role_end(self, expr: SglRoleEnd):
        if (
            self.cur_role == "assistant"
            and self.num_api_spec_tokens is not None
            and getattr(self.backend, "is_chat_model", False)
        ):
            self.backend.role_end_generate(self)
        self.cur_role = None

        new_text = self.text_[self.cur_role_begin_pos :].lstrip()
        _, suffix = self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)
        self._execute_fill(suffix)

        if self.cur_images:
            content = [{"type": "text", "text": new_text}]
            for _, data in self.cur_images:
                content.append(
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}
                )
            self.messages_.append({"role": expr.role, "content": content})
            self.cur_images = []
        else:
            self.messages_.append({"role": expr.role, "content": new_text})

    def _execute_var_scope_begin(self, expr: SglVarScopeBegin):
        self.variables[expr.name] = len(self.text_)

    def _execute_var_scope_end(self, expr: SglVarScopeEnd):
        self.variables[expr.name] = self.text_[self.variables[expr.name] :]
        self.variable_event[expr.name].set()

    def _execute_commit_lazy_operations(self, expr: SglCommitLazy):
        self.backend.commit_lazy_operations(self)

    def _execute_concatenate_and_append_text(self, expr: SglConcateAndAppend):
        new_text = ""
        for s in expr.states:
            exe = s.stream_executor
            exe.sync()
            new_text += exe.text_[exe.fork_start_text_pos :]
        self._execute_fill(new_text)

    def _execute_concatenate_and_append_kv_cache(self, expr: SglConcateAndAppend):
        self_len = len(self.text_)
        for s in expr.states:
            s.stream_executor.submit(SglCommitLazy())
        for s in expr.states:
            exe = s.stream_executor
            exe.sync()
            assert exe.fork_start_text_pos == self_len
            self.text_ += exe.text_[exe.fork_start_text_pos :]
        src_rids = [state.stream_executor.sid for state in expr.states]
        self.backend.concatenate_and_append(src_rids, self.sid)

    def _execute_separate_reasoning(self, expr: SglSeparateReasoning):
        if self.stream:
            return  # as SGLang: not supported while streaming
        if (
            self.cur_role == "assistant"
            and self.num_api_spec_tokens is not None
            and getattr(self.backend, "is_chat_model", False)
        ):
            self.backend.role_end_generate(self)
        other = expr.expr
        if not other:
            return
        if isinstance(other, (SglGen, SglSelect)):
            cur_text = self.get_var(other.name)
            reasoning, normal_text = split_reasoning(cur_text, expr.model_type)
            reasoning_name = expr.process_name_for_reasoning(other.name)
            self.set_var(other.name, normal_text)
            self.set_var(reasoning_name, reasoning)
            self.variable_event.setdefault(reasoning_name, threading.Event()).set()
            if self.cur_role_begin_pos is not None:
                self.text_ = self.text_[: self.cur_role_begin_pos] + normal_text
        elif isinstance(other, SglExprList):
            for x in other.expr_list:
                self._execute_separate_reasoning(SglSeparateReasoning(expr.model_type, x))


    def _resolve_sampling_params(self, sampling_params):
        """The program's defaults (run(...) arguments) overridden by the gen's
        own non-None values, with the chat template's stop strings added."""
        clone = copy.deepcopy(self.default_sampling_para)
        for item in (
            "max_new_tokens",
            "min_new_tokens",
            "n",
            "stop",
            "stop_token_ids",
            "stop_regex",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "ignore_eos",
            "return_logprob",
            "logprob_start_len",
            "top_logprobs_num",
            "return_text_in_logprobs",
            "dtype",
            "regex",
            "json_schema",
        ):
            value = getattr(sampling_params, item, None)
            if value is not None:
                setattr(clone, item, copy.copy(value))

        if self.chat_template.stop_str:
            stop = clone.stop
            stop = [] if not stop else ([stop] if isinstance(stop, str) else list(stop))
            stop += [x for x in self.chat_template.stop_str if x not in stop]
            clone.stop = stop
        clone.skip_special_tokens = global_config.skip_special_tokens_in_output
        clone.spaces_between_special_tokens = global_config.spaces_between_special_tokens_in_out
        return clone


# What a StreamExecutor does with each kind of expression (see `_execute`).
_EXPR_HANDLERS: dict[type, Callable[[ExpressionHandlers, Any], None]] = {
    SglConstantText: ExpressionHandlers._execute_constant_text,
    SglGen: ExpressionHandlers._execute_gen,
    SglSelect: ExpressionHandlers._execute_select,
    SglExprList: ExpressionHandlers._execute_expr_list,
    SglRoleBegin: ExpressionHandlers._execute_role_begin,
    SglRoleEnd: ExpressionHandlers._execute_role_end,
    SglImage: ExpressionHandlers._execute_image,
    SglVideo: ExpressionHandlers._execute_video,
    SglVariable: ExpressionHandlers._execute_variable,
    SglVarScopeBegin: ExpressionHandlers._execute_var_scope_begin,
    SglVarScopeEnd: ExpressionHandlers._execute_var_scope_end,
    SglCommitLazy: ExpressionHandlers._execute_commit_lazy_operations,
    SglConcateAndAppend: ExpressionHandlers._execute_concate_and_append,
    SglSeparateReasoning: ExpressionHandlers._execute_separate_reasoning,
}
