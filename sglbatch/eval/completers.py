"""Ways to complete an eval's prompts: an SGLang frontend program (on the in-process engine
or a server's native API), or transformers `generate` as the reference peer.

Each yields `(index, Completion)` as prompts finish, in any order, so the caller can show
progress and keep every answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from sglbatch.bench.datasets import BenchRequest
from sglbatch.bench.transformers_baseline import TransformersGenerator
from sglbatch.engine.tokenizer import find_stop_string


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int


def complete_with_program(backend: Any, prompts: list[str], max_new_tokens: int,
                          stop: list[str], parallel: int) -> Iterator[tuple[int, Completion]]:
    """SGLang's GSM8K benchmark program (`s += prompt + gen("answer", ...)`), `parallel`
    programs in flight, on an sglbatch.lang backend."""
    import sglbatch.lang as sgl

    @sgl.function
    def few_shot_qa(s, prompt):
        s += prompt
        s += sgl.gen("answer", max_tokens=max_new_tokens, stop=stop)

    def one(prompt: str) -> Completion:
        state = few_shot_qa.run(prompt=prompt, temperature=0, backend=backend)
        return Completion(state["answer"], state.get_meta_info("answer")["completion_tokens"])

    with ThreadPoolExecutor(parallel, thread_name_prefix="eval") as pool:
        futures = {pool.submit(one, prompt): i for i, prompt in enumerate(prompts)}
        for future in as_completed(futures):
            yield futures[future], future.result()


def complete_with_transformers(generator: TransformersGenerator, prompt_ids: list[list[int]],
                               max_new_tokens: int, stop: list[str], batch_size: int
                               ) -> Iterator[tuple[int, Completion]]:
    """Greedy transformers `generate` on the same token ids, `batch_size` prompts at a
    time; each text is cut before its first stop string, as the engine returns it."""
    requests = [BenchRequest(ids, max_new_tokens, stop=tuple(stop), ignore_eos=False)
                for ids in prompt_ids]
    for indices, outputs in generator.generate_all(requests, batch_size):
        for i, ids in zip(indices, outputs):
            text = generator.tokenizer.decode(ids, skip_special_tokens=True)
            found = find_stop_string(text, stop, len(text))  # the engine's own stop search
            yield i, Completion(text[:found[0]] if found else text, len(ids))
