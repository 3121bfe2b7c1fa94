"""The seed registry (benchmarks/seeds.py): disjoint uses, and the code takes its seeds from it.

benchmarks/ is not part of the package; no frame is simulated here.
"""

import ast
import importlib
import inspect
import itertools
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(not (BENCH / "seeds.py").is_file(),
                                reason="benchmarks/ not present (installed package)")

#: Modules whose code must hold no literal frame seed (they import them from the registry).
NO_LITERAL_SEEDS = ("labelled", "bench_baselines", "bench_cnn_cost", "bench_stokes",
                    "bench_maximask", "bench_crowding", "bench_psf", "tune_cues", "bench_combine",
                    "bench_calibration")


@pytest.fixture(scope="module")
def bench():
    """Imports benchmark modules as their scripts do (benchmarks/ first on sys.path)."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCH))
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(BENCH)):
                del sys.modules[name]


@pytest.fixture(scope="module")
def registry(bench):
    return bench("seeds")


def test_every_use_is_well_formed(registry):
    assert set(registry.ROLES) == {u.role for u in registry.SEEDS.values()}
    for name, use in registry.SEEDS.items():
        assert use.name == name
        seeds = use.frames()
        assert len(seeds) == use.n == len(set(seeds)), name
        assert use.frames(1) == seeds[:1]
        with pytest.raises(ValueError, match="registry lists"):
            use.frames(use.n + 1)
    with pytest.raises(ValueError, match="first <= last"):
        registry.SeedUse("x", "tuning", "", "", first=5, last=4)
    with pytest.raises(ValueError, match="first <= last"):
        registry.SeedUse("x", "tuning", "", "", first=5, last=6, master=1, n_frames=2)
    with pytest.raises(ValueError, match="role"):
        registry.SeedUse("x", "testing", "", "", first=5, last=6)


def test_uses_are_pairwise_disjoint(registry):
    """Tuning, training and evaluation frames never coincide (derived seeds included)."""
    expanded = {name: set(use.frames()) for name, use in registry.SEEDS.items()}
    for (a, sa), (b, sb) in itertools.combinations(expanded.items(), 2):
        assert not sa & sb, f"{a} and {b} share frame seeds {sorted(sa & sb)[:5]}"


def test_table_lists_every_use(registry):
    table = registry.seed_table()
    for use in registry.SEEDS.values():
        assert f"{use.name} " in table and use.purpose in table


def _int_literals(path: Path) -> set[int]:
    tree = ast.parse(path.read_text())
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and type(node.value) is int}


@pytest.mark.parametrize("module", NO_LITERAL_SEEDS)
def test_benchmarks_hold_no_literal_seeds(module, registry):
    registered = set().union(*(u.frames() for u in registry.SEEDS.values()))
    registered |= {u.master for u in registry.SEEDS.values() if u.derived}
    literal = _int_literals(BENCH / f"{module}.py") & {s for s in registered if s >= 1000}
    assert not literal, f"{module}.py: frame seeds {sorted(literal)} not taken from seeds.py"


def test_benchmark_seeds_are_the_registrys(bench, registry):
    seeds = registry.SEEDS
    for module in NO_LITERAL_SEEDS:
        if hasattr(bench(module), "SEEDS"):
            assert bench(module).SEEDS is seeds, module
    for module, key in (("bench_crowding", "crowding"), ("bench_psf", "psf")):
        plan = bench(module).frame_plan
        assert [p[-1] for p in plan(False)] == seeds[key].frames(), module
        assert set(p[-1] for p in plan(True)) <= set(seeds[key].frames()), module
    night = bench("bench_night")
    assert (night.NIGHT_SEED, night.FULL_NIGHT) == (seeds["night"].master, seeds["night"].n_frames)
    stage_seed = inspect.signature(bench("bench_stages").profile_frame).parameters["seed"].default
    assert stage_seed == seeds["stage_profile"].first


def test_cue_tuning_grid_contains_the_defaults(bench):
    from robopol_clean.config import CueConfig

    tune = bench("tune_cues")
    default = CueConfig()
    for quick in (True, False):
        cues = tune.settings(quick)
        assert cues[0] == default and len(set(cues)) == len(cues)
    for grid in (tune.GRID, tune.QUICK_GRID):
        assert all(getattr(default, name) in values for name, values in grid.items())


def test_package_seeds_are_the_registrys(registry):
    """The shipped model, its training defaults and the demo use the registered seeds."""
    from robopol_clean.classify.cnn import default_model_path
    from robopol_clean.demo import run_demo
    from robopol_clean.training import DEFAULT_MODEL_CONFIG, train_default_model

    train, test = registry.SEEDS["cnn_training"], registry.SEEDS["cnn_test"]
    n_frames = inspect.signature(train_default_model).parameters["n_frames"].default
    assert (DEFAULT_MODEL_CONFIG.seed, n_frames) == (train.master, train.n_frames)
    assert inspect.signature(run_demo).parameters["seed"].default == registry.SEEDS["demo"].first
    meta_path = default_model_path().with_suffix(".json")
    if not meta_path.is_file():
        pytest.skip("no shipped model")
    data = json.loads(meta_path.read_text())["data"]
    assert (data["train"]["seed"], data["train"]["n_frames"]) == (train.master, train.n_frames)
    assert (data["test"]["seed"], data["test"]["n_frames"]) == (test.master, test.n_frames)


def test_combine_plan_is_the_registrys(bench, registry):
    plan = bench("bench_combine").plan
    assert [f for f, _ in plan(False)] == registry.SEEDS["combine_fields"].frames()
    assert [s for _, frames in plan(False) for s, _ in frames] == registry.SEEDS["combine"].frames()
    assert set(s for _, frames in plan(True) for s, _ in frames) <= set(registry.SEEDS["combine"].frames())
