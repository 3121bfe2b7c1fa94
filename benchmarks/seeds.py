"""Every simulation seed behind a number this repository reports, in one registry.

Each use of simulated frames is one :class:`SeedUse`: either frame seeds used directly
(``first``..``last``) or a master seed from which the frame seeds are derived
(:func:`robopol_clean.simulate.frame_seeds`, ``SeedSequence.spawn``). The rule: no frame
seed serves two uses, so the frames a setting was tuned on, the frames a model learned
from and the frames a benchmark evaluates are never the same frames
(``tests/test_seeds.py`` checks it on the expanded seeds, derived ones included). The
benchmark modules take their seeds from here; ``docs/seeds.rst`` prints the table.

The unit tests' small seeds (0 to about 20, tiny frames checked against fixed
expectations) are not listed: no reported number comes from them.

    python benchmarks/seeds.py      # print the table
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ROLES", "SeedUse", "SEEDS", "seed_table", "print_seed_table"]

#: What frames may be used for: learning a model, choosing settings, measuring.
ROLES = ("training", "tuning", "evaluation")


@dataclass(frozen=True)
class SeedUse:
    """One use of simulated frames and the seeds it draws them from.

    Give either ``first`` and ``last`` (frame seeds used directly, inclusive) or
    ``master`` and ``n_frames`` (``n_frames`` frame seeds derived from ``master``).

    Attributes
    ----------
    name : str
        Key in :data:`SEEDS`.
    role : {"training", "tuning", "evaluation"}
        What the frames are for.
    purpose : str
        What is simulated and measured, in a line.
    used_by : str
        The code that simulates the frames.
    first, last : int, optional
        First and last frame seed of a range.
    master : int, optional
        Master seed of derived frame seeds.
    n_frames : int, optional
        Number of derived frame seeds (the full run's).
    """

    name: str
    role: str
    purpose: str
    used_by: str
    first: int | None = None
    last: int | None = None
    master: int | None = None
    n_frames: int | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role must be one of {ROLES}, got {self.role!r}")
        ranged = (self.master is None and self.n_frames is None
                  and self.first is not None and self.last is not None and self.first <= self.last)
        derived = (self.first is None and self.last is None
                   and self.master is not None and (self.n_frames or 0) > 0)
        if not (ranged or derived):
            raise ValueError(f"{self.name}: give first <= last, or master and n_frames > 0")

    @property
    def derived(self) -> bool:
        """True when the frame seeds are derived from a master seed."""
        return self.master is not None

    def frames(self, n: int | None = None) -> list[int]:
        """The frame seeds, in the order the code uses them.

        Parameters
        ----------
        n : int, optional
            Only the first ``n`` (a quick run); default all.

        Returns
        -------
        list of int
            Frame seeds as given to :func:`~robopol_clean.simulate.simulate_frame`.

        Raises
        ------
        ValueError
            ``n`` outside 1 .. the number of frames listed (seeds beyond the registered
            ones would be unaccounted for).
        """
        if self.derived:
            from robopol_clean.simulate import frame_seeds

            seeds = frame_seeds(self.master, self.n_frames)
        else:
            seeds = list(range(self.first, self.last + 1))
        if n is None:
            return seeds
        if not 1 <= n <= len(seeds):
            raise ValueError(f"{self.name}: {n} frames asked, the registry lists {len(seeds)}")
        return seeds[:n]

    @property
    def seeds_text(self) -> str:
        """'30000-30002', '7' or 'master 0 (derived)'."""
        if self.derived:
            return f"master {self.master} (derived)"
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @property
    def n(self) -> int:
        """Number of frames."""
        return self.n_frames if self.derived else self.last - self.first + 1


_USES = (
    # training
    SeedUse("cnn_training", "training",
            "the shipped CNN's training + validation frames (1024 x 1024; threshold calibration)",
            "robopol_clean/training.py", master=0, n_frames=240),
    SeedUse("benchmark_train", "training",
            "frames the benchmarks' own models learn from (random forest, CNN variants)",
            "benchmarks/labelled.py", first=20_000, last=20_007),
    # tuning
    SeedUse("photometry_tuning", "tuning",
            "choice of the photometry settings (flag limits, residual search)",
            "no committed script", first=70_000, last=70_004),
    SeedUse("cue_tuning", "tuning",
            "choice of the partner-cue tolerances (CueConfig): 500 stars, 12 reflection sources",
            "benchmarks/tune_cues.py", first=90_000, last=90_015),
    # evaluation
    SeedUse("stage_profile", "evaluation",
            "the stage-timing frame (800 stars; timings only)",
            "benchmarks/bench_stages.py", first=7, last=7),
    SeedUse("demo", "evaluation",
            "the demo frame (600 stars) quoted in the README",
            "robopol_clean/demo.py", first=2026, last=2026),
    SeedUse("benchmark_test", "evaluation",
            "held-out labelled detections: classifier baselines, CNN cost",
            "benchmarks/labelled.py", first=10_000, last=10_007),
    SeedUse("stokes", "evaluation",
            "Stokes q/u with and without cleaning (500 stars, 12 reflection sources)",
            "benchmarks/bench_stokes.py", first=30_000, last=30_002),
    SeedUse("maximask", "evaluation",
            "MaxiMask vs robopol-clean (1024 x 1024, 8 reflection sources)",
            "benchmarks/bench_maximask.py", first=40_000, last=40_002),
    SeedUse("night", "evaluation",
            "a simulated night: throughput, memory, determinism (150-900 stars)",
            "benchmarks/bench_night.py", master=50_000, n_frames=100),
    SeedUse("crowding", "evaluation",
            "Stokes completeness and pulls, 200-1200 stars x FWHM 3-6 px",
            "benchmarks/bench_crowding.py", first=60_000, last=60_023),
    SeedUse("psf", "evaluation",
            "PSF photometry on rendered 512 x 512 star fields",
            "benchmarks/bench_psf.py", first=80_000, last=80_011),
    SeedUse("combine", "evaluation",
            "combined q/u of a visit: 3 fields x 5 dithered exposures (600 stars, WCS)",
            "benchmarks/bench_combine.py", first=96_000, last=96_014),
    SeedUse("combine_fields", "evaluation",
            "the star fields of those visits (field_seed: the same stars in every exposure)",
            "benchmarks/bench_combine.py", first=96_100, last=96_102),
    SeedUse("calibration", "evaluation",
            "calibration from standards: 3 frames of BD+59 389, 3 of HD 212311 (injected effects)",
            "benchmarks/bench_calibration.py", first=95_000, last=95_005),
    SeedUse("calibration_coverage", "evaluation",
            "the same check repeated: 50 sets of six 1024 x 1024 standard-star frames",
            "benchmarks/bench_calibration.py", first=95_100, last=95_399),
    SeedUse("cnn_test", "evaluation",
            "the shipped CNN's test frames (model card); robopol-clean evaluate: the first 20",
            "robopol_clean/training.py", master=1_000_003, n_frames=40),
)

#: The registry: every use of simulated frames by name, training first, then tuning,
#: then evaluation.
SEEDS: dict[str, SeedUse] = {u.name: u for u in _USES}


def seed_table() -> str:
    """The registry as a plain-text table: one line per use, its purpose below it.

    Returns
    -------
    str
        Columns name, role, frame seeds, number of frames, the code that uses them.
    """
    rows = [(u.name, u.role, u.seeds_text, str(u.n), u.used_by) for u in SEEDS.values()]
    head = ("name", "role", "frame seeds", "frames", "used by")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.rjust(w) if i == 3 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    for use, row in zip(SEEDS.values(), rows):
        out += [line(row), f"    {use.purpose}"]
    return "\n".join(out)


def print_seed_table() -> None:
    """Print :func:`seed_table`."""
    print(seed_table())


if __name__ == "__main__":
    print_seed_table()
