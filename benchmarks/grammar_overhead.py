"""The cost of structured outputs (issue #5's report): a batch of JSON-schema requests
against the same batch unconstrained, generating the same number of tokens per request.

    python benchmarks/grammar_overhead.py --requests 64

The constrained batch runs first; each unconstrained request is then held to exactly the
length its constrained twin produced (max_new_tokens with ignore_eos), so
both batches decode the same tokens and the ratio is the grammar's overhead alone (mask
filling on the CPU, mask application, the fp32 logits copy it needs). Both runs start from
an empty prefix cache, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

from sglbatch import Engine, GenerateRequest, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 40},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16},
                   "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "skills", "active"],
}
TOPICS = ["a chef", "a pilot", "a student", "a painter", "a nurse", "a farmer", "a coder",
          "a singer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--model-path", default="smollm2-135m-instruct")
    args = parser.parse_args()
    chats = [[{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} number {i} "
                                          "as a JSON object."}] for i in range(args.requests)]
    schema = json.dumps(SCHEMA)
    with Engine(model_path=args.model_path) as engine:
        engine.run([GenerateRequest(messages=chat,  # warm-up
                                    sampling_params=SamplingParams(max_new_tokens=8))
                    for chat in chats[:4]])
        engine.flush_cache()
        start = time.perf_counter()
        constrained = engine.run([GenerateRequest(messages=chat, sampling_params=SamplingParams(
            temperature=1.0, sampling_seed=i, max_new_tokens=256, json_schema=schema))
            for i, chat in enumerate(chats)])
        t_constrained = time.perf_counter() - start
        lengths = [o.meta_info.completion_tokens for o in constrained]
        valid = sum(_is_json(o.text) for o in constrained)
        engine.flush_cache()
        start = time.perf_counter()
        engine.run([GenerateRequest(messages=chat, sampling_params=SamplingParams(
            temperature=1.0, sampling_seed=i, max_new_tokens=n, ignore_eos=True))
            for i, (chat, n) in enumerate(zip(chats, lengths))])
        t_free = time.perf_counter() - start
    tokens = sum(lengths)
    print(json.dumps({
        "requests": args.requests, "output_tokens": tokens, "valid_json": valid,
        "constrained_s": round(t_constrained, 2), "unconstrained_s": round(t_free, 2),
        "constrained_tok_s": round(tokens / t_constrained, 1),
        "unconstrained_tok_s": round(tokens / t_free, 1),
        "throughput_ratio": round(t_free / t_constrained, 3),
    }, indent=2))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
