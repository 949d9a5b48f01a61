"""Privacy settings and profiles: bad input gives clear errors."""

import math
from pathlib import Path

import pytest

from medcausal.errors import MedCausalError
from medcausal.privacy import Privacy, PrivacyError, load_profile

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("eps", [0, -1.0, -math.inf])
def test_epsilon_must_be_positive(eps):
    with pytest.raises(PrivacyError, match="epsilon must be > 0"):
        Privacy(epsilon=eps)


def test_infinite_epsilon_is_refused():
    with pytest.raises(PrivacyError, match="privacy=None"):
        Privacy(epsilon=math.inf)


def test_exactly_one_mode():
    with pytest.raises(PrivacyError, match="exactly one"):
        Privacy()
    with pytest.raises(PrivacyError, match="exactly one"):
        Privacy(epsilon=1.0, noise_multiplier=1.0)
    assert Privacy(noise_multiplier=1.0).mode == "fixed-noise"
    assert Privacy(epsilon=1.0).mode == "target-epsilon"


@pytest.mark.parametrize("kw,match", [
    ({"delta": 0.0}, "delta must be in"), ({"delta": 1.0}, "delta must be in"),
    ({"max_grad_norm": 0}, "clipping norm"), ({"accountant": "gdp"}, "accountant"),
    ({"grad_sample_mode": "magic"}, "grad_sample_mode"), ({"standardize": "data"}, "standardize"),
    ({"public_bounds": {"age": (5, 1)}}, "low < high"), ({"public_bounds": {"age": 3}}, "pair"),
    ({"row_level": True}, "unit_column"),
    ({"unit_column": "p", "max_rows_per_unit": 3}, "row_level=True"),
    ({"unit_column": "p", "row_level": True, "max_rows_per_unit": 0}, "max_rows_per_unit"),
    ({"unit_column": "p", "row_level": True, "max_rows_per_unit": 2.5}, "max_rows_per_unit"),
    ({"stats_share": 1.0}, "stats_share"),
    ({"epsilon": "abc"}, "must be a number"),
])
def test_bad_settings_name_the_culprit(kw, match):
    args = {"epsilon": 1.0, **kw}
    with pytest.raises(PrivacyError, match=match):
        Privacy(**args)


def test_privacy_error_is_a_medcausal_error():
    assert issubclass(PrivacyError, MedCausalError) and issubclass(PrivacyError, ValueError)


@pytest.mark.parametrize("name,eps", [("eps1", 1.0), ("eps3", 3.0), ("eps8", 8.0)])
def test_shipped_profiles_load(name, eps):
    p = load_profile(ROOT / "privacy" / f"{name}.toml")
    assert p.epsilon == eps and p.mode == "target-epsilon" and p.delta is None


def test_profiles_merge_tables_and_reject_unknown_keys(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text('epsilon = 3.0\n[public_bounds]\nage = [18, 100]\n')
    b = tmp_path / "b.toml"
    b.write_text('unit_column = "patient"\n[public_bounds]\nbmi = [10, 60]\n')
    p = load_profile(a, b)
    assert p.public_bounds == {"age": (18.0, 100.0), "bmi": (10.0, 60.0)} and p.unit_column == "patient"
    bad = tmp_path / "bad.toml"
    bad.write_text("epsilon = 3.0\nepsilonn = 2.0\n")
    with pytest.raises(PrivacyError, match="epsilonn"):
        load_profile(bad)
    with pytest.raises(PrivacyError, match="does not exist"):
        load_profile(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("epsilon = \n")
    with pytest.raises(PrivacyError, match="not valid TOML"):
        load_profile(broken)


def test_to_dict_round_trip():
    p = Privacy(epsilon=2.0, public_bounds={"x": (0, 1)}, unit_column="pid")
    assert Privacy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("settings, match", [
    ({"epsilon": 1.0, "public_bounds": {"age": "18"}}, "public_bounds"),  # unpacked as (1.0, 8.0)
    ({"epsilon": 1.0, "physical_batch_size": 2.5}, "physical_batch_size"),
    ({"epsilon": 1.0, "physical_batch_size": "abc"}, "physical_batch_size"),
    ({"epsilon": 1.0, "stats_share": "abc"}, "stats_share"),
    ({"noise_multiplier": 1.0, "stats_noise_multiplier": math.inf}, "stats_noise_multiplier"),
])
def test_bad_settings_are_privacy_errors_naming_the_setting(settings, match):
    with pytest.raises(PrivacyError, match=match):
        Privacy(**settings)


def test_numpy_integers_are_whole_numbers_everywhere():
    import numpy as np

    p = Privacy(epsilon=1.0, physical_batch_size=np.int64(256), unit_column="p", row_level=True, force=True,
                max_rows_per_unit=np.int64(3))
    assert (p.physical_batch_size, p.max_rows_per_unit) == (256, 3)
    assert type(p.physical_batch_size) is int and type(p.max_rows_per_unit) is int
