"""enable_torch_compile fuses RMSNorm and SwiGLU; in fp32 greedy tokens stay the same."""

from __future__ import annotations

from sglbatch.engine.engine import Engine
from sglbatch.engine.layers.norm import RMSNorm, rms_norm
from tests.engine.conftest import PROMPTS


def test_compiled_elementwise_ops_keep_greedy_tokens(engine, smollm2_dir):
    params = {"temperature": 0, "max_new_tokens": 16}
    expected = [o["output_ids"] for o in engine.generate(PROMPTS[:4], params)]
    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.25,
                enable_torch_compile=True) as compiled:
        norms = [m for m in compiled.model_runner.model.modules() if isinstance(m, RMSNorm)]
        # One compiled function shared by every layer, so it compiles once.
        assert len({id(m.impl) for m in norms}) == 1 and norms[0].impl is not rms_norm
        got = [o["output_ids"] for o in compiled.generate(PROMPTS[:4], params)]
    assert got == expected
