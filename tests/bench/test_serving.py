"""`sglbatch bench serving` against the session's real server on loopback (native, OpenAI
completions and chat APIs), its failure reporting, and the metrics on hand-made records."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from sglbatch.bench.datasets import random_requests
from sglbatch.bench.serving import parse_rates, run_rate
from sglbatch.bench.serving_metrics import RequestOutput, compute_metrics, token_times
from sglbatch.cli import main

NUM, INPUT_LEN, OUTPUT_LEN, RATIO = 8, 32, 8, 0.5
WORKLOAD = ["--dataset-name", "random", "--num-prompts", str(NUM), "--random-input-len",
            str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN), "--random-range-ratio",
            str(RATIO)]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("backend", ["sglbatch", "openai", "openai-chat"])
def test_bench_serving_sweep_records_add_up(server, tmp_path, monkeypatch, backend):
    summary, details, png = tmp_path / "s.jsonl", tmp_path / "d.jsonl", tmp_path / "p.png"
    key = ["--api-key", server.api_key]
    if backend == "openai-chat":  # the key from the environment, as the OpenAI clients
        monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
        key = []
    plot = ["--plot", str(png)] if backend == "sglbatch" else []
    assert main(["bench", "serving", "--backend", backend, "--base-url", server.url, *key,
                 *WORKLOAD, "--request-rate", "inf,8", "--max-concurrency", "4",
                 "--output-file", str(summary), "--output-details", str(details), *plot]) == 0

    expected = random_requests(NUM, INPUT_LEN, OUTPUT_LEN, RATIO, 49152, seed=1)
    records = _lines(summary)
    assert [r["request_rate"] for r in records] == ["inf", "8"]
    rows = _lines(details)
    assert len(rows) == 2 * NUM
    for rec in records:
        mine = [row for row in rows if row["request_rate"] == rec["request_rate"]]
        assert rec["completed"] == NUM and rec["failed"] == 0 and rec["errors"] == []
        # ignore_eos: each request generates exactly its requested length
        assert [row["output_len"] for row in mine] == [r.output_len for r in expected]
        assert rec["total_output_tokens"] == sum(r.output_len for r in expected)
        assert rec["total_input_tokens"] == sum(row["prompt_len"] for row in mine)
        if backend == "sglbatch":  # token ids sent as they are
            assert rec["total_input_tokens"] == sum(len(r.input_ids) for r in expected)
        assert rec["output_throughput"] * rec["duration"] == pytest.approx(
            rec["total_output_tokens"])
        assert rec["request_throughput"] * rec["duration"] == pytest.approx(NUM)
        assert rec["total_throughput"] == pytest.approx(
            rec["input_throughput"] + rec["output_throughput"])
        assert rec["concurrency"] == pytest.approx(
            sum(row["latency"] for row in mine) / rec["duration"])
        assert rec["concurrency"] <= 4 + 1e-6  # --max-concurrency 4
        for name in ("ttft", "tpot", "itl", "e2e_latency"):
            assert 0 < rec[f"median_{name}_ms"] <= rec[f"p90_{name}_ms"] <= rec[f"p99_{name}_ms"]
        assert rec["mean_e2e_latency_ms"] == pytest.approx(
            1000 * sum(row["latency"] for row in mine) / NUM)
        for row in mine:
            assert row["success"] and row["error"] is None
            assert 0 < row["ttft"] <= row["latency"]
            assert row["start_time"] + row["latency"] <= rec["duration"] + 1e-6
            assert sum(row["itl"]) <= row["latency"] - row["ttft"] + 1e-6
            if backend == "sglbatch":  # one event per token, counted by meta_info
                assert len(row["itl"]) == row["output_len"] - 1
            else:  # one ITL per chunk with text; a chunk carries one token or more
                assert len(row["itl"]) <= row["output_len"] - 1
    if not plot:
        return
    data = png.read_bytes()  # the sweep's plot: latency percentiles at 2 rates, tokens/s
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 400


def test_bench_serving_counts_failed_requests(server, tmp_path, capsys):
    summary, details = tmp_path / "s.jsonl", tmp_path / "d.jsonl"
    code = main(["bench", "serving", "--backend", "openai", "--base-url", server.url,
                 "--api-key", server.api_key, "--model", "no-such-model",
                 "--tokenizer", "smollm2-135m-instruct", *WORKLOAD, "--warmup-requests", "0",
                 "--output-file", str(summary), "--output-details", str(details)])
    assert code == 1  # a rate that completed nothing
    rec = _lines(summary)[0]
    assert rec["completed"] == 0 and rec["failed"] == NUM
    assert rec["total_output_tokens"] == 0 and rec["output_throughput"] == 0
    assert len(rec["errors"]) == 1 and "404" in rec["errors"][0]
    assert "no-such-model" in rec["errors"][0]
    rows = _lines(details)
    assert len(rows) == NUM and all(not r["success"] and "404" in r["error"] for r in rows)
    captured = capsys.readouterr()
    assert f"{NUM} of {NUM} request(s) failed" in captured.err
    assert "Failed requests" in captured.out


def test_bench_serving_wrong_api_key_fails_requests_not_the_command(server, tmp_path):
    summary = tmp_path / "s.jsonl"
    code = main(["bench", "serving", "--backend", "sglbatch", "--base-url", server.url,
                 "--api-key", "wrong", *WORKLOAD, "--num-prompts", "2", "--output-file",
                 str(summary)])
    rec = _lines(summary)[0]
    assert code == 1 and rec["failed"] == 2 and "401" in rec["errors"][0]


def test_bench_serving_unreachable_server_names_base_url(capsys):
    from tests.server.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["bench", "serving", "--base-url", url, *WORKLOAD]) == 2
    err = capsys.readouterr().err
    assert "--base-url" in err and url in err


def test_bench_serving_rejects_bad_rates():
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("0", "-1", "fast"):
        with pytest.raises(Exception, match="request rate"):
            parse_rates(bad)
    with pytest.raises(SystemExit):
        main(["bench", "serving", "--request-rate", "0"])


def test_compute_metrics_on_hand_made_records():
    outputs = [
        RequestOutput(success=True, ttft=0.1, itl=[0.05, 0.05, 0.1], latency=0.3,
                      prompt_len=10, output_len=4),
        RequestOutput(success=True, ttft=0.2, itl=[], latency=0.2, prompt_len=20,
                      output_len=1),  # one token: no TPOT
        RequestOutput(success=False, error="HTTP 500: boom", latency=0.05, prompt_len=7),
    ]
    m = compute_metrics(outputs, duration=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 5)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["input_throughput"] == pytest.approx(15.0)
    assert m["output_throughput"] == pytest.approx(2.5)
    assert m["total_throughput"] == pytest.approx(17.5)
    assert m["concurrency"] == pytest.approx(0.25)  # (0.3 + 0.2) / 2
    assert m["mean_ttft_ms"] == pytest.approx(150) and m["median_ttft_ms"] == pytest.approx(150)
    assert m["p99_ttft_ms"] == pytest.approx(199)  # linear interpolation between 100 and 200
    assert m["mean_tpot_ms"] == pytest.approx(200 / 3)  # (0.3 - 0.1) / (4 - 1)
    assert m["mean_itl_ms"] == pytest.approx(200 / 3)
    assert m["median_itl_ms"] == pytest.approx(50)
    assert m["p90_itl_ms"] == pytest.approx(90)
    assert m["mean_e2e_latency_ms"] == pytest.approx(250)
    assert m["std_e2e_latency_ms"] == pytest.approx(50)


def test_compute_metrics_with_nothing_completed():
    m = compute_metrics([RequestOutput(error="x")], duration=0.0)
    assert m["completed"] == 0 and m["failed"] == 1
    assert m["output_throughput"] == 0 and m["concurrency"] == 0
    assert m["mean_ttft_ms"] == 0 and m["p99_itl_ms"] == 0


def test_token_times_and_throughput_buckets():
    from sglbatch.bench.plot import throughput_over_time

    out = RequestOutput(success=True, start_time=1.0, ttft=0.5, itl=[0.25, 0.25], latency=1.5,
                        output_len=4)  # the last chunk carried two tokens
    assert token_times(out) == [1.5, 1.75, 2.0, 2.5]
    assert token_times(RequestOutput(success=False, output_len=4)) == []
    mids, rates = throughput_over_time([out], bucket_s=1.0)
    assert mids == [0.5, 1.5, 2.5] and rates == [0.0, 2.0, 2.0]


def test_run_rate_keeps_the_concurrency_cap_and_input_order():
    in_flight, peak = 0, 0

    async def fake(client, inp):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return RequestOutput(success=True, prompt_len=inp, output_len=1)

    outputs, duration = asyncio.run(run_rate(None, fake, list(range(12)), math.inf, 3, seed=0))
    assert peak == 3 and [o.prompt_len for o in outputs] == list(range(12))
    assert all(0 <= o.start_time <= duration for o in outputs)
    peak = 0
    asyncio.run(run_rate(None, fake, list(range(6)), math.inf, None, seed=0))
    assert peak == 6  # inf with no cap: all at once


def _cached_tokens(server) -> float:
    import httpx

    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("sglang:cached_tokens_total"))


@pytest.mark.parametrize("flush", [True, False])
def test_each_rate_starts_with_an_empty_prefix_cache(server, tmp_path, flush):
    """The OpenAI backend against a server with /flush_cache: the second rate sends the
    first one's prompts again, which only --disable-flush-cache lets it find cached."""
    summary = tmp_path / "s.jsonl"
    before = _cached_tokens(server)
    assert main(["bench", "serving", "--backend", "openai", "--base-url", server.url,
                 "--api-key", server.api_key, *WORKLOAD, "--seed", "7" if flush else "8",
                 "--warmup-requests", "0", "--request-rate", "inf,inf", "--output-file",
                 str(summary), *([] if flush else ["--disable-flush-cache"])]) == 0
    cached = _cached_tokens(server) - before
    one_rate = _lines(summary)[0]["total_input_tokens"]
    if flush:
        assert cached <= NUM  # nothing shared but, at most, a first token
    else:
        assert cached >= one_rate - 2 * NUM  # the second rate's prompts, all but their ends
