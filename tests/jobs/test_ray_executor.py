"""`executor: ray` and sglbatch.ray on one local Ray cluster (2 CPUs) for the session: the same
records as the local runner, JSONL and Parquet, bad rows, and exactly once after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sglbatch.cli import parse_args
from sglbatch.jobs.runner import JobRunner
from sglbatch.jobs.spec import load_jobs
from sglbatch.jobs.writer import ResultWriter, parts_dir
from sglbatch.jobs.yaml_source import SpecError
from tests.jobs.helpers import read_output, write_job, write_prompt_job

ray = pytest.importorskip("ray")
from sglbatch.jobs.ray_executor import RayJobRunner  # noqa: E402 - needs ray

ROWS = [{"id": f"q{i}", "question": f"What is {i} plus {i % 7}?"} for i in range(40)]
ROWS[7] = {"id": "q7", "topic": "no question column"}  # a bad row: an error record
RAY = {"replicas": 2, "batch_size": 4, "num_cpus_per_replica": 1}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session; every process it started is gone afterwards."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    started = [p for p in psutil.Process().children(recursive=True)
               if p.pid not in before and "ray" in " ".join(_cmdline(p))]
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"Ray processes left running: {[p.pid for p in alive]}"


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # it exited meanwhile
        return []


@pytest.fixture(scope="module")
def local_records(engine, smollm2_dir, tmp_path_factory):
    """The local runner's records for ROWS (the reference)."""
    tmp = tmp_path_factory.mktemp("local")
    [job] = load_jobs(write_prompt_job(tmp, smollm2_dir, ROWS))
    JobRunner(job, engine).run()
    return read_output(tmp / "out.jsonl")


def _comparable(records):
    """What a run must reproduce: all but meta_info's request id, latency and cache hits."""
    drop = {"id", "e2e_latency", "cached_tokens"}
    return [{**r, "meta_info": {k: v for k, v in r["meta_info"].items() if k not in drop}}
            if r.get("meta_info") else r for r in records]


def _ray_job(tmp_path, smollm2_dir, **job):
    [spec] = load_jobs(write_prompt_job(tmp_path, smollm2_dir, ROWS, **{
        "executor": "ray", "ray": RAY, **job}))
    return spec


def test_jsonl_job_on_two_replicas_matches_the_local_runner(ray_cluster, local_records,
                                                            smollm2_dir, tmp_path):
    stats = RayJobRunner(_ray_job(tmp_path, smollm2_dir)).run()
    out = read_output(tmp_path / "out.jsonl")
    assert _comparable(out) == _comparable(local_records)
    assert stats.rows == 40 and stats.errors == 1
    [bad] = [r for r in out if "error" in r]
    assert bad["id"] == "q7" and "no column 'question'" in bad["error"]
    assert not parts_dir(tmp_path / "out.jsonl").exists()


def test_a_glob_uri_over_several_files_numbers_rows_as_the_local_reader(
        ray_cluster, engine, smollm2_dir, tmp_path):
    """Ray Data reads a file:// glob (the fsspec path S3 and GCS take): with no id column,
    a filter, a limit that ends inside the last file, a line that is not JSON and a prompt
    over the context, every record (ids are indexes) equals the local runner's."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"question": f"What is {i} times 3?", "keep": i % 4 != 1} for i in range(18)]
    rows[10]["question"] = "word " * 9000  # longer than the model's context
    for part, chunk in enumerate((rows[:5], rows[5:11], rows[11:])):
        lines = [json.dumps(r) for r in chunk]
        if part == 1:
            lines.insert(2, "{not json")
        (data / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    job = {"prompt": "Q: {question}\nA:", "order": "input",
           "input": {"path": str(data / "part-*.jsonl"), "filter": "keep", "limit": 11},
           "output": {"path": str(tmp_path / "local.jsonl"), "sort_output": True}}
    [local] = load_jobs(write_job(tmp_path / "local.yaml", smollm2_dir, **job))
    JobRunner(local, engine).run()
    ray_job = {**job, "executor": "ray", "ray": RAY,
               "input": {**job["input"], "path": f"file://{data}/part-*.jsonl"},
               "output": {**job["output"], "path": str(tmp_path / "ray.jsonl")}}
    [remote] = load_jobs(write_job(tmp_path / "ray.yaml", smollm2_dir, **ray_job))
    assert remote.input.uri is not None and remote.input.paths == []
    stats = RayJobRunner(remote).run()
    want = read_output(tmp_path / "local.jsonl")
    got = read_output(tmp_path / "ray.jsonl")
    assert _comparable(got) == _comparable(want)
    assert [r["index"] for r in got] == [0, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13]
    assert stats.rows == 11 and stats.errors == 2
    errors = {r["index"]: r["error"] for r in got if "error" in r}
    assert "invalid JSON" in errors[7] and "part-1.jsonl:3" in errors[7]
    assert "context" in errors[11]


def test_cli_executor_flag_runs_parquet_to_parquet(ray_cluster, local_records, smollm2_dir,
                                                   tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "in.parquet")
    job_file = write_prompt_job(tmp_path, smollm2_dir, [], ray=RAY,
                                input={"path": "in.parquet", "id_column": "id"},
                                output={"path": "out.parquet", "sort_output": True})
    args = parse_args(["run", str(job_file), "--executor", "ray"])
    assert args.func(args) == 0
    out = read_output(tmp_path / "out.parquet")
    # Parquet has no missing columns: row q7 has a `question` (null), which renders.
    assert [(r["id"], r["text"]) for r in out if r["id"] != "q7"] == [
        (r["id"], r["text"]) for r in local_records if r["id"] != "q7"]
    assert all(r.get("error") is None for r in out)


def test_a_rerun_after_a_crash_writes_every_row_once(ray_cluster, local_records, smollm2_dir,
                                                     tmp_path):
    job = _ray_job(tmp_path, smollm2_dir)
    # A run killed after committing two chunks: its parts folder, no output.
    writer = ResultWriter(job.output, job.output.path, chunk_rows=6)
    for record in local_records[10:22]:
        writer.add(record)
    writer.close()
    stats = RayJobRunner(job).run()
    assert stats.skipped == 12 and stats.rows == 28
    out = read_output(tmp_path / "out.jsonl")
    assert _comparable(out) == _comparable(local_records)


def test_a_driver_killed_mid_run_then_rerun_writes_every_row_once(ray_cluster, local_records,
                                                                    smollm2_dir, tmp_path):
    address = ray.get_runtime_context().gcs_address  # the killed run joins this cluster
    job_file = write_prompt_job(tmp_path, smollm2_dir, ROWS, executor="ray",
                                ray={**RAY, "batch_size": 2, "address": address})
    run = subprocess.Popen([sys.executable, "-m", "sglbatch", "run", str(job_file)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = parts_dir(tmp_path / "out.jsonl")
    _wait_for_a_commit(parts, run.poll)
    run.kill()
    run.wait()
    committed = sum(len(p.read_text().splitlines()) for p in parts.glob("part-*.jsonl"))
    assert 0 < committed < 40
    [job] = load_jobs(job_file)
    stats = RayJobRunner(job).run()
    assert stats.skipped == committed and stats.rows == 40 - committed
    assert _comparable(read_output(tmp_path / "out.jsonl")) == _comparable(local_records)


def _wait_for_a_commit(parts, exited):
    deadline = time.monotonic() + 120
    while not any(parts.glob("part-*.jsonl")):
        assert exited() is None, "the run ended before committing a batch"
        assert time.monotonic() < deadline, "no batch committed in 120 s"
        time.sleep(0.05)


def test_an_actor_killed_mid_run_loses_no_row_and_repeats_none(ray_cluster, local_records,
                                                               smollm2_dir, tmp_path):
    job = _ray_job(tmp_path, smollm2_dir, ray={**RAY, "batch_size": 2})
    failure = []
    run = threading.Thread(target=lambda: _catch(failure, RayJobRunner(job).run))
    run.start()
    _wait_for_a_commit(parts_dir(job.output.path), lambda: None if run.is_alive() else 0)
    [victim, *_] = [p for p in psutil.Process().children(recursive=True)
                    if "JobReplica" in " ".join(_cmdline(p))]
    os.kill(victim.pid, signal.SIGKILL)
    run.join(timeout=300)
    assert not run.is_alive() and not failure, failure
    assert _comparable(read_output(job.output.path)) == _comparable(local_records)


def _catch(failure, fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - reported by the test's thread
        failure.append(e)


def test_processor_adds_text_meta_info_and_error_columns(ray_cluster, local_records,
                                                         smollm2_dir):
    from sglbatch.ray import SglbatchProcessor

    processor = SglbatchProcessor(
        {"model_path": str(smollm2_dir), "dtype": "float32", "kv_cache_gb": 0.5},
        {"temperature": 0, "max_new_tokens": 12}, prompt="Q: {question}\nA:",
        postprocess=lambda row: {**row, "answer": (row["text"] or "").strip()})
    # Arrow gives every row every column: the bad row here is one over the context.
    rows = [*ROWS[:7], {"id": "q7", "question": "word " * 9000}, *ROWS[8:10]]
    by_id = {r["id"]: r for r in processor(ray.data.from_items(rows)).take_all()}
    for want in local_records[:10]:
        if want["id"] != "q7":
            got = by_id[want["id"]]
            assert (got["text"], got["error"]) == (want["text"], None)
            assert json.loads(got["meta_info"])["completion_tokens"] == 12
    bad = by_id["q7"]
    assert "context" in bad["error"] and bad["text"] is None and bad["answer"] == ""


def test_spec_refuses_ray_for_endpoint_jobs_and_names_the_extra(smollm2_dir, tmp_path,
                                                                monkeypatch):
    job_file = write_prompt_job(tmp_path, smollm2_dir, ROWS[:2], executor="ray",
                                ray={"replicas": 0})
    with pytest.raises(SpecError, match=r"job.yaml:\d+: ray.replicas: must be >= 1"):
        load_jobs(job_file)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(SpecError, match=r'executor: Ray is not installed \(fix: pip install '
                                        r'"sglbatch\[ray\]"\)'):
        load_jobs(job_file)
    local = write_prompt_job(tmp_path, smollm2_dir, ROWS[:2])
    with pytest.raises(SpecError, match="not installed"):
        load_jobs(local, executor="ray")  # what `sglbatch run --executor ray` does
    assert load_jobs(local)[0].executor == "local"


def test_spec_ray_section(smollm2_dir, tmp_path):
    job_file = write_prompt_job(tmp_path, smollm2_dir, ROWS[:2], ray={
        "address": "auto", "replicas": 3, "num_gpus_per_replica": 0.5})
    [job] = load_jobs(job_file, executor="ray")
    assert (job.executor, job.ray.address, job.ray.replicas, job.ray.num_gpus_per_replica,
            job.ray.batch_size) == ("ray", "auto", 3, 0.5, 64)
    bad = write_prompt_job(tmp_path, smollm2_dir, ROWS[:2], ray={"replica": 2})
    with pytest.raises(SpecError, match="ray.replica: unknown key 'replica'.*'replicas'"):
        load_jobs(bad)
    endpoint = write_prompt_job(tmp_path, smollm2_dir, ROWS[:2], executor="ray",
                                model=None, endpoint={"url": "http://localhost:1"})
    with pytest.raises(SpecError, match="executor: ray runs in-process engines"):
        load_jobs(endpoint)
    uri = write_prompt_job(tmp_path, smollm2_dir, [], input={"path": "s3://bucket/q/*.jsonl"})
    with pytest.raises(SpecError, match="input.path: a URI input is read on a Ray cluster"):
        load_jobs(uri)
    [remote] = load_jobs(uri, executor="ray")
    assert (remote.input.uri, remote.input.format) == ("s3://bucket/q/*.jsonl", "jsonl")
