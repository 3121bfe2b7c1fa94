"""The benchmarks' shared statistics (benchmarks/ is not part of the package)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"

pytestmark = pytest.mark.skipif(not COMMON.is_file(), reason="benchmarks/ not present (installed package)")


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_roc_auc_is_scikit_learns(common):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.normal(size=200) + y, 1)  # with ties
    assert common.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # infinite scores (a method that cannot measure a spot) rank as extreme values
    s_inf = s.copy()
    s_inf[:10], s_inf[10:20] = np.inf, -np.inf
    s_big = s.copy()
    s_big[:10], s_big[10:20] = 1e9, -1e9
    assert common.roc_auc(y, s_inf) == pytest.approx(roc_auc_score(y, s_big), abs=1e-12)
    assert np.isnan(common.roc_auc(np.ones(5), np.arange(5.0)))


def test_only_a_complete_run_writes_the_committed_results(common, tmp_path, capsys):
    import argparse

    committed = {"json": (tmp_path / "latest.json").resolve(), "rst": (tmp_path / "t.rst").resolve()}

    def resolve(argv, complete):
        parser = argparse.ArgumentParser()
        parser.add_argument("--json", default=None)
        parser.add_argument("--rst", default=None)
        args = parser.parse_args(argv)
        common.output_paths(parser, args, committed, complete, "a full run")
        return args.json, args.rst

    assert resolve([], True) == (str(committed["json"]), str(committed["rst"]))
    assert resolve([], False) == ("", "")  # a partial run writes nothing by default
    assert resolve(["--json", str(tmp_path / "mine.json")], False) == (str(tmp_path / "mine.json"), "")
    with pytest.raises(SystemExit):
        resolve(["--json", str(committed["json"])], False)
    assert "only a full run writes the committed results" in capsys.readouterr().err
