"""SGLang's module path for RuntimeEndpoint and Runtime (programs import them from here);
they live in native_endpoint.py and runtime.py."""

from sglbatch.lang.backend.native_endpoint import (
    RuntimeEndpoint,
    compute_normalized_prompt_logprobs,
)
from sglbatch.lang.backend.runtime import Runtime

__all__ = ["Runtime", "RuntimeEndpoint", "compute_normalized_prompt_logprobs"]
