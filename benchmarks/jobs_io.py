"""Should `sglbatch run` read and write Parquet/CSV with polars instead of pyarrow?

    pip install polars && python benchmarks/jobs_io.py --rows 1000000

Writes a synthetic dataset (an id, a topic and a ~120-character question per row) as Parquet
and CSV, then, each in a fresh process so peak memory is its own, streams every row as a
Python dict the way the job runner consumes them (batches of 1,024), and writes the same
records back as Parquet. It prints seconds and peak RSS for each library and format.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_ROWS = 1024  # as sglbatch.jobs.reader


def make_data(folder: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    ids = [f"row-{i}" for i in range(rows)]
    topics = [("geography", "math", "history", "science")[i % 4] for i in range(rows)]
    questions = [f"Question {i}: what is the capital of country number {i % 193}, and which "
                 f"river flows through it, if any?" for i in range(rows)]
    table = pa.table({"id": ids, "topic": topics, "question": questions})
    pq.write_table(table, folder / "in.parquet")
    pacsv.write_csv(table, folder / "in.csv")


def read_pyarrow(path: Path) -> int:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    count = 0
    if path.suffix == ".parquet":
        with pq.ParquetFile(path) as f:
            batches = f.iter_batches(batch_size=BATCH_ROWS)
            count = sum(len(batch.to_pylist()) for batch in batches)
        return count
    with pacsv.open_csv(path) as reader:
        names = reader.schema.names
    options = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()))
    with pacsv.open_csv(path, convert_options=options) as reader:
        return sum(len(batch.to_pylist()) for batch in reader)


def read_polars(path: Path) -> int:
    import polars as pl

    frame = pl.scan_parquet(path) if path.suffix == ".parquet" else \
        pl.scan_csv(path, infer_schema=False)  # every column a string, as the job reader
    return sum(len(batch.to_dicts()) for batch in frame.collect_batches(chunk_size=BATCH_ROWS))


def write_pyarrow(records: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def write_polars(records: list[dict], path: Path) -> None:
    import polars as pl

    pl.from_dicts(records).write_parquet(path)


def run_one(library: str, what: str, folder: Path) -> dict:
    start = time.perf_counter()
    if what == "write parquet":
        records = [{"id": f"row-{i}", "text": "Paris is the capital of France. " * 3,
                    "completion_tokens": 24} for i in range(200_000)]
        start = time.perf_counter()
        (write_pyarrow if library == "pyarrow" else write_polars)(records, folder / "out.parquet")
        rows = len(records)
    else:
        path = folder / ("in.parquet" if what == "read parquet" else "in.csv")
        rows = (read_pyarrow if library == "pyarrow" else read_polars)(path)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"library": library, "task": what, "rows": rows, "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak_mb)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--one", nargs=3, metavar=("LIBRARY", "TASK", "FOLDER"),
                        help=argparse.SUPPRESS)  # a single measurement, in a fresh process
    parser.add_argument("--make", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        library, what, folder = args.one
        print(json.dumps(run_one(library, what.replace("-", " "), Path(folder))))
        return 0
    if args.make:
        make_data(Path(args.make), args.rows)
        return 0
    # Linux keeps a process's peak RSS across exec: this process stays small, and the data
    # is made in a child of its own.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, __file__, "--make", tmp, "--rows", str(args.rows)],
                       check=True)
        print(f"{args.rows:,} rows: parquet {(folder / 'in.parquet').stat().st_size >> 20} MB, "
              f"csv {(folder / 'in.csv').stat().st_size >> 20} MB")
        for what in ("read-parquet", "read-csv", "write-parquet"):
            for library in ("pyarrow", "polars"):
                out = subprocess.run([sys.executable, __file__, "--one", library, what, tmp],
                                     capture_output=True, text=True, check=True).stdout
                print(out.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
