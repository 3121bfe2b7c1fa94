"""The README's and the model card's numbers come from the committed results files.

``docs/scripts/results_tables.py`` generates them; here it only compares (nothing is
rerun), so a page edited by hand, or a results file updated without regenerating the
pages, fails.
"""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "scripts" / "results_tables.py"

pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="docs/ not present (installed package)")


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pages_agree_with_the_results_files(tables):
    diffs = tables.stale()
    assert not diffs, "\n".join(diffs) + "\nrun: python docs/scripts/results_tables.py --write"


def test_a_changed_result_is_noticed(tables, tmp_path, monkeypatch):
    """The check can fail: a different AUC in the results changes the generated pages."""
    latest = json.loads((tables.RESULTS / "latest.json").read_text())
    for sec in latest["sections"]:
        if sec["key"] == "baselines":
            sec["data"]["methods"]["CNN + partner cues (pipeline default)"]["auc"] = 0.5
    (tmp_path / "latest.json").write_text(json.dumps(latest))
    for name in ("night.json", "demo.json", "real_frame.json", "combine.json",
                 "calibration.json"):
        if (tables.RESULTS / name).is_file():
            (tmp_path / name).write_text((tables.RESULTS / name).read_text())
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert any("AUC 0.5000" in d for d in tables.stale())


def test_pages_include_the_generated_pieces(tables):
    card = (ROOT / "docs" / "model_card.rst").read_text()
    for path in tables.expected():
        if path.parent == tables.GENERATED:
            assert f".. include:: generated/{path.name}" in card
