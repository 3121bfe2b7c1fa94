"""The one recorded configuration: defaults, validation, TOML files, recording."""

import pytest

from robopol_clean.config import (
    ConfigError,
    CueConfig,
    PhotometryConfig,
    ReductionConfig,
    as_reduction_config,
    load_config,
)


def test_defaults_have_no_differences_and_a_stable_hash():
    cfg = ReductionConfig()
    assert cfg.non_default() == {}
    assert cfg.digest() == ReductionConfig().digest()
    assert cfg.threshold == 0.5 and cfg.uncertain_band == (0.3, 0.5)
    assert cfg.cues == CueConfig() and cfg.photometry == PhotometryConfig()


def test_nested_differences_are_flattened_and_change_the_hash():
    cfg = ReductionConfig.from_dict({"threshold": 0.7, "cues": {"orphan_z_half": 4.0},
                                     "photometry": {"method": "aperture"}})
    assert cfg.non_default() == {"threshold": 0.7, "cues.orphan_z_half": 4.0,
                                 "photometry.method": "aperture"}
    assert cfg.digest() != ReductionConfig().digest()
    assert ReductionConfig(threshold=1).digest() == ReductionConfig(threshold=1.0).digest()


def test_updated_ignores_unset_command_line_options():
    cfg = ReductionConfig(threshold=0.6)
    assert cfg.updated(threshold=None, photometry_method=None) == cfg
    new = cfg.updated(photometry_method="aperture", cues_support_min_snr=3.0)
    assert new.threshold == 0.6 and new.photometry.method == "aperture"
    assert new.cues.support_min_snr == 3.0
    with pytest.raises(ConfigError, match="photometry method"):
        cfg.updated(photometry_method="optimal")


@pytest.mark.parametrize(("values", "message"), [
    ({"threshold": 0.0}, "threshold must be in"),
    ({"uncertain_band": [0.6, 0.4]}, "uncertain_band"),
    ({"detection_threshold": -1}, "detection_threshold must be a positive"),
    ({"cues": {"orphan_z_width": 0}}, "orphan_z_width must be a positive"),
    ({"photometry": {"psf_max_stars": 2.5}}, "psf_max_stars"),
    ({"thresold": 0.5}, "unknown setting 'thresold'"),
    ({"photometry": {"metod": "psf"}}, r"\[photometry\]: unknown setting 'metod'"),
])
def test_bad_values_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        ReductionConfig.from_dict(values)


def test_toml_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "night.toml"
    path.write_text('threshold = 0.6\nuncertain_band = [0.25, 0.6]\n\n'
                    '[photometry]\nmethod = "aperture"\nchi2_limit = 4.0\n')
    cfg = load_config(path)
    assert cfg.uncertain_band == (0.25, 0.6) and cfg.photometry.chi2_limit == 4.0
    assert as_reduction_config(str(path)) == cfg
    assert as_reduction_config(PhotometryConfig(method="aperture")).photometry.method == "aperture"
    (tmp_path / "bad.toml").write_text("threshold = \n")
    with pytest.raises(ConfigError, match="bad.toml: not a valid TOML file"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="missing.toml: cannot read"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "typo.toml").write_text("[cue]\norphan_z_half = 3\n")
    with pytest.raises(ConfigError, match="typo.toml: unknown setting 'cue'"):
        load_config(tmp_path / "typo.toml")


def test_frozen():
    with pytest.raises(AttributeError):
        ReductionConfig().threshold = 0.9


def test_cue_settings_reach_the_partner_cues(small_sim, profile, morphology):
    """A changed cue tolerance changes p_orphan, and the change is recorded."""
    import numpy as np

    from robopol_clean.pipeline import reduce_frame

    base = reduce_frame(small_sim.ccd, profile=profile, classifier=morphology)
    strict = reduce_frame(small_sim.ccd, profile=profile, classifier=morphology,
                          config=ReductionConfig(cues=CueConfig(orphan_z_half=1.0)))
    assert strict.meta["config"] == {"cues.orphan_z_half": 1.0}
    detected = np.isfinite(np.asarray(base.spots["p_orphan"], float))
    assert np.sum(strict.spots["p_orphan"][detected]) > np.sum(base.spots["p_orphan"][detected])
