"""Numbers in the README come from the committed benchmark results, not typed by hand."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latest.json"


@pytest.fixture
def bench_crowding(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_crowding

    yield bench_crowding
    sys.modules.pop("bench_crowding", None)


def test_readme_crowding_row_matches_results(bench_crowding):
    sections = {s["key"]: s for s in json.loads(RESULTS.read_text())["sections"]}
    data = sections["crowding"]["data"]
    row = bench_crowding.readme_row(data["results"], len(data["plan"]))
    readme = (ROOT / "README.md").read_text()
    assert row in readme, f"README.md lacks the generated row:\n{row}"
