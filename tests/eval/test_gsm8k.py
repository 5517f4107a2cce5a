"""`sglbatch eval gsm8k` on the shared GSM8K copy: the reported score equals one recomputed
here from the saved answers and the raw test file; the in-process engine, the session server
(`--base-url`) and transformers `generate` give the same greedy answers."""

from __future__ import annotations

import json
import re

import pytest

from sglbatch.cli import main
from tests.conftest import SHARED_GSM8K

NUM_QUESTIONS = 20
# Enough for most 5-shot answers of the default model to reach "Question" and stop.
MAX_NEW_TOKENS = 160


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _last_number(text: str) -> int | None:
    # Written out again here, from SGLang's benchmark, rather than imported.
    numbers = re.findall(r"\d+", text.replace(",", ""))
    return int(numbers[-1]) if numbers else None


def _eval(tmp_path, name: str, *args: str) -> tuple[dict, list[dict]]:
    out = tmp_path / f"{name}.jsonl"
    assert main(["eval", "gsm8k", "--data-path", str(SHARED_GSM8K), "--output-file", str(out),
                 "--max-new-tokens", str(MAX_NEW_TOKENS), *args]) == 0
    records = _lines(out)
    assert len(records) == 1
    return records[0], _lines(tmp_path / f"{name}.answers.jsonl")


@pytest.fixture(scope="module")
def in_process(smollm2_dir, tmp_path_factory) -> tuple[dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("gsm8k")
    return _eval(tmp, "engine", "--model-path", str(smollm2_dir), "--dtype", "float32",
                 "--kv-cache-gb", "0.3", "--num-questions", str(NUM_QUESTIONS),
                 "--parallel", str(NUM_QUESTIONS))


def test_score_equals_one_recomputed_from_the_saved_answers(in_process):
    record, answers = in_process
    test_rows = _lines(SHARED_GSM8K / "test.jsonl")[:NUM_QUESTIONS]
    assert [a["question"] for a in answers] == [row["question"] for row in test_rows]
    labels = [_last_number(row["answer"].split("####")[-1]) for row in test_rows]
    preds = [_last_number(a["completion"]) for a in answers]
    correct = sum(p == label for p, label in zip(preds, labels))
    assert record["num_questions"] == NUM_QUESTIONS
    assert record["accuracy"] == correct / NUM_QUESTIONS
    assert record["invalid"] == sum(p is None for p in preds) / NUM_QUESTIONS
    assert [a["correct"] for a in answers] == [p == label for p, label in zip(preds, labels)]
    # Tokens counted are the tokens generated; none past the cap, none after a stop word.
    assert record["num_output_tokens"] == sum(a["completion_tokens"] for a in answers)
    assert all(0 < a["completion_tokens"] <= MAX_NEW_TOKENS for a in answers)
    assert not any("Question" in a["completion"] for a in answers)
    assert record["output_throughput"] == pytest.approx(
        record["num_output_tokens"] / record["latency"])
    # 5-shot prompts: the worked examples come from the train file, then the question.
    first_train = _lines(SHARED_GSM8K / "train.jsonl")[0]["question"]
    assert all(a["prompt"].startswith(f"Question: {first_train}") for a in answers)
    assert all(a["prompt"].count("Question: ") == 6 for a in answers)
    assert record["num_shots"] == 5 and record["backend"] == "sglbatch"


def test_server_gives_the_in_process_answers(in_process, server, tmp_path):
    record, answers = _eval(tmp_path, "server", "--base-url", server.url, "--api-key",
                            server.api_key, "--num-questions", "6", "--parallel", "3")
    assert record["base_url"] == server.url and record["num_questions"] == 6
    # Both fp32 and greedy: batching differently must not change a token.
    assert [a["completion"] for a in answers] == [a["completion"] for a in in_process[1][:6]]


def test_transformers_gives_the_in_process_answers(in_process, smollm2_dir, tmp_path):
    record, answers = _eval(tmp_path, "hf", "--backend", "transformers", "--model-path",
                            str(smollm2_dir), "--dtype", "float32", "--num-questions", "4",
                            "--parallel", "2")
    assert record["backend"] == "transformers"
    assert [a["completion"] for a in answers] == [a["completion"] for a in in_process[1][:4]]


def test_appends_to_the_output_file(smollm2_dir, tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text('{"earlier": "run"}\n')
    args = ["eval", "gsm8k", "--data-path", str(SHARED_GSM8K), "--output-file", str(out),
            "--model-path", str(smollm2_dir), "--kv-cache-gb", "0.1", "--num-questions", "1",
            "--num-shots", "1", "--max-new-tokens", "8"]
    assert main(args) == 0
    lines = _lines(out)
    assert lines[0] == {"earlier": "run"} and lines[1]["num_questions"] == 1
    assert {"accuracy", "invalid", "num_questions", "latency", "output_throughput"} <= set(lines[1])


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["eval", "gsm8k", "--data-path", str(tmp_path), "--num-questions", "1"]) == 2
    assert "train.jsonl and test.jsonl" in capsys.readouterr().err
    assert main(["eval", "gsm8k", "--data-path", str(SHARED_GSM8K), "--parallel", "0"]) == 2
    assert "--parallel" in capsys.readouterr().err


def test_unreachable_or_refusing_servers_are_clear_errors(server, capsys):
    from tests.server.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    args = ["eval", "gsm8k", "--data-path", str(SHARED_GSM8K), "--num-questions", "1"]
    assert main([*args, "--base-url", url]) == 2
    assert f"--base-url {url}" in capsys.readouterr().err
    assert main([*args, "--base-url", server.url, "--api-key", "wrong"]) == 2
    assert "HTTP 401" in capsys.readouterr().err


def test_failed_download_names_data_path(tmp_path, monkeypatch, capsys):
    from sglbatch.bench import gsm8k

    monkeypatch.setenv("SGLBATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gsm8k, "PUBLIC_URL", (tmp_path / "missing-{split}.jsonl").as_uri())
    assert main(["eval", "gsm8k", "--num-questions", "1"]) == 2
    assert "--data-path" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.part"))  # nothing half-written left in the cache
