"""Appends every benchmark row to benchmarks/results/results.jsonl with machine, commit and date,
and rewrites benchmarks/results/summary.md (speed-up and memory ratio against the baseline)."""
import datetime
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _harness  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pytest_sessionfinish(session, exitstatus):
    rows = _harness.RESULTS
    if not rows:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sha = _harness.commit()
    with open(RESULTS_DIR / "results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(dict(r, commit=sha, date=stamp, note=_harness.env_note())) + "\n")
    from benchmarks.summarize import write_summary
    write_summary(RESULTS_DIR)
