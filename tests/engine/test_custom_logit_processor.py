"""Custom logit processors: SGLang's serialized form, run only when the engine allows it."""

from __future__ import annotations

import pytest
import torch

from sglbatch import CustomLogitProcessor


class ForceToken(CustomLogitProcessor):
    """Makes each row's `custom_params["token_id"]` the only possible token."""

    def __call__(self, logits, custom_param_list=None):
        for row, params in enumerate(custom_param_list):
            assert params["__req__"].rid  # SGLang hands the request along
            logits[row] = float("-inf")
            logits[row, params["token_id"]] = 0.0
        return logits


def test_refused_unless_enabled(engine):
    with pytest.raises(ValueError, match="enable_custom_logit_processor"):
        engine.generate("Hi", {"max_new_tokens": 2},
                        custom_logit_processor=ForceToken.to_str())


def test_processor_shapes_only_its_rows(smollm2_dir):
    from sglbatch.engine.engine import Engine

    def make_local_processor():
        # Defined in a function, so dill must carry the class by value.
        class Ban(CustomLogitProcessor):
            def __call__(self, logits, custom_param_list=None):
                for row, params in enumerate(custom_param_list):
                    logits[row, params["banned"]] = -torch.inf
                return logits
        return Ban

    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.2,
                enable_custom_logit_processor=True) as eng:
        greedy = {"temperature": 0, "max_new_tokens": 6}
        plain = eng.generate("The capital of France is", greedy)
        forced, free = eng.generate(
            ["The capital of France is"] * 2,
            [{**greedy, "custom_params": {"token_id": 42}}, greedy],
            custom_logit_processor=[ForceToken.to_str(), None])
        assert forced["output_ids"] == [42] * 6
        assert free["output_ids"] == plain["output_ids"]

        first = plain["output_ids"][0]
        banned = eng.generate("The capital of France is",
                              {**greedy, "custom_params": {"banned": first}},
                              custom_logit_processor=make_local_processor().to_str())
        assert banned["output_ids"][0] != first

        with pytest.raises(ValueError, match="custom_logit_processor: cannot load"):
            eng.generate("Hi", greedy, custom_logit_processor='{"callable": "00"}')
