"""GSM8K data: loading (a path, or the public URL with a local cache) and k-shot prompts
in the format SGLang's GSM8K benchmark uses."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from pathlib import Path

from sglbatch.engine.model_source import cache_dir

logger = logging.getLogger(__name__)

PUBLIC_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
              "grade_school_math/data/{split}.jsonl")
STOP = ["Question", "Assistant:", "<|separator|>"]


def load_gsm8k(split: str, data_path: str | Path | None = None) -> list[dict[str, str]]:
    """Rows of `{split}.jsonl` (train | test) from `data_path` (a directory or the file itself),
    or downloaded once from the public URL into the cache."""
    if data_path is not None:
        path = Path(data_path)
        path = path / f"{split}.jsonl" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"GSM8K: {path} does not exist (give the folder holding "
                                    f"train.jsonl and test.jsonl, or a .jsonl file)")
    else:
        path = cache_dir() / "datasets" / "gsm8k" / f"{split}.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            logger.info("downloading GSM8K %s to %s", split, path)
            tmp = path.with_suffix(".part")
            url = PUBLIC_URL.format(split=split)
            try:
                urllib.request.urlretrieve(url, tmp)
            except OSError as e:  # URLError and HTTPError included
                tmp.unlink(missing_ok=True)
                raise ValueError(f"GSM8K: cannot download {url} ({e}); give the folder "
                                 "holding train.jsonl and test.jsonl (--data-path)") from None
            tmp.rename(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}:{i + 1}: a GSM8K row needs 'question' and 'answer'")
    return rows


def few_shot_prefix(train: list[dict[str, str]], num_shots: int) -> str:
    """The shared k-shot prefix: the first `num_shots` training examples."""
    return "".join(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n"
                   for ex in train[:num_shots])


def question_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


INVALID = None


def answer_value(text: str) -> int | None:
    """The last run of digits in `text`, commas dropped, as SGLang's GSM8K benchmark reads
    both the reference answers and the model's (`\\d+`: no sign, no decimals). None when
    there is no number (an invalid answer)."""
    numbers = re.findall(r"\d+", text.replace(",", ""))
    return int(numbers[-1]) if numbers else INVALID
