"""Arguments of the wrong type fail at construction, naming the argument, what it got and what is valid.

Before: ``ef_scaling="no"`` (and ``"false"``) turned scaling on, ``seed=1.7`` became 1, ``seed="abc"``
failed in a bare ``int()``, ``progress_bar_metrics="no"`` became True, and a string ``sample_ratio``
failed in a comparison inside the compressor. Every GMCConfig field, every compressor field and every
method option is tried with a value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from lightning_gmc import COMPRESSORS, METHODS, GMCConfig, GMCFabricStrategy, GMCStrategy, build_compressor
from lightning_gmc.methods import method_option_names


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"ef_scaling": "no"}, r"ef_scaling must be True, False or None, got 'no' \(str\)"),
        ({"ef_scaling": "false"}, r"ef_scaling must be True, False or None, got 'false' \(str\)"),
        ({"ef_scaling": 0}, r"ef_scaling must be True, False or None, got 0 \(int\)"),
        ({"seed": 1.7}, r"seed must be an integer, got 1\.7 \(float\)"),
        ({"seed": "abc"}, r"seed must be an integer, got 'abc' \(str\)"),
        ({"seed": True}, r"seed must be an integer, got True \(bool\)"),
        (
            {"compressor": "topk_approx", "compressor_options": {"sample_ratio": "0.5"}},
            r"sample_ratio must be in \(0, 1\], got '0\.5' \(str\)",
        ),
        (
            {"method": "dgc", "method_options": {"momentum_masking": "no"}},
            r"momentum_masking must be True or False",
        ),
        ({"compressor_options": "sample_ratio=0.5"}, r"compressor_options must be a dict"),
        ({"density": "0.1"}, r"density must be in \(0, 1\], got '0\.1' \(str\)"),
    ],
)
@pytest.mark.parametrize("strategy", [GMCStrategy, GMCFabricStrategy])
def test_wrong_types_are_refused_with_the_valid_choices(
    strategy: type, kwargs: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(TypeError, match=pattern):
        strategy(**kwargs)


def test_progress_bar_metrics_takes_only_a_bool() -> None:
    for value in ("no", "false", 0, None):
        with pytest.raises(TypeError, match=r"progress_bar_metrics must be True or False, got"):
            GMCStrategy(progress_bar_metrics=value)
    assert GMCStrategy(progress_bar_metrics=False).progress_bar_metrics is False


def test_whole_floats_are_integers_and_real_bools_pass() -> None:
    config = GMCConfig(seed=2.0, ef_scaling=False)  # YAML may write 2.0
    assert config.seed == 2 and isinstance(config.seed, int) and config.ef_scaling is False
    assert GMCStrategy(seed=3, ef_scaling=True).gmc_state.seed == 3


# A value of the wrong type for every GMCConfig field; a new field without an entry fails the test.
WRONG_TYPED = {
    "method": 3,
    "compressor": 3.5,
    "density": "0.01",
    "detach": "0.5",
    "momentum": [0.9],
    "seed": 1.5,
    "method_options": ["detach"],
    "compressor_options": "sample_ratio",
    "ef_scaling": "yes",
    "nonfinite": True,
    "on_world_size_change": 1,
    "hierarchy": None,
    "wire_dtype": 16,
    "auto_density": "min_density=0.1",
}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(GMCConfig)])
def test_every_config_field_refuses_a_wrong_type(field: str) -> None:
    assert field in WRONG_TYPED, f"add a wrong-typed value for the new field {field!r}"
    value = WRONG_TYPED[field]
    with pytest.raises((TypeError, ValueError)) as caught:
        GMCConfig(**{field: value})
    message = str(caught.value)
    assert re.search(rf"\b{field}\b", message) and repr(value) in message, message


def _compressor_fields() -> list[tuple[str, str]]:
    return [
        (name, f.name) for name, cls in sorted(COMPRESSORS.items()) for f in dataclasses.fields(cls) if f.init
    ]


@pytest.mark.parametrize(("compressor", "field"), _compressor_fields())
def test_every_compressor_field_refuses_a_wrong_type(compressor: str, field: str) -> None:
    wrong = object()
    with pytest.raises((TypeError, ValueError)) as caught:
        build_compressor(compressor, **{field: wrong})
    assert field in str(caught.value) and "object" in str(caught.value), caught.value


def _method_options() -> list[tuple[str, str]]:
    return [(name, option) for name in sorted(METHODS) for option in method_option_names(name)]


@pytest.mark.parametrize(("method", "option"), _method_options())
def test_every_method_option_refuses_a_wrong_type(method: str, option: str) -> None:
    wrong = object()
    with pytest.raises((TypeError, ValueError)) as caught:
        GMCConfig(method=method, method_options={option: wrong})
    assert option in str(caught.value) and "object" in str(caught.value), caught.value
