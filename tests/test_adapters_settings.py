"""`adapter_settings`: what every adapter method will use on a tiny random model, defaults and
placement resolved, as the JSON an evaluation run's manifest keeps; bad settings refused with
the field named; a method without a declared hyperparameter type gives None."""

from __future__ import annotations

import json
from typing import Any

import pytest

from memedit import InvalidRequestError
from memedit.adapters import adapter_names, adapter_settings, register_adapter
from memedit.adapters.api import _ADAPTERS


def test_every_adapter_method_resolves_its_defaults_and_placement(tiny: Any) -> None:
    model, _ = tiny
    count = model.config.num_hidden_layers
    found = {name: adapter_settings(name, None, model) for name in adapter_names()}
    assert set(found) >= {"grace", "lora", "adalora", "tpatcher", "wise"}
    for name, settings in found.items():
        assert settings is not None, name
        assert json.loads(json.dumps(settings)) == settings, name  # plain JSON values
    for name in ("grace", "tpatcher", "wise"):
        layer = found[name]["layer"]  # type: ignore[index]
        assert isinstance(layer, int) and 0 <= layer < count, name
    wise = found["wise"]
    assert wise is not None and 0 <= wise["router_layer"] <= wise["layer"]
    lora = found["lora"]
    assert (
        lora is not None
        and lora["targets"]
        and all(isinstance(t, str) and model.get_submodule(t) is not None for t in lora["targets"])
    )
    # AdaLoRA's own fields are kept beside the LoRA ones it shares
    adalora = found["adalora"]
    assert adalora is not None and set(adalora) > set(lora)


def test_given_settings_override_the_defaults_and_equal_resolutions_compare_equal(
    tiny: Any,
) -> None:
    model, _ = tiny
    default = adapter_settings("grace", None, model)
    assert default is not None
    explicit = adapter_settings("grace", {"layer": default["layer"]}, model)
    assert explicit is not None and explicit["layer"] == default["layer"]
    # the given layer is recorded as given; the layer it resolves to is the same edit
    assert {k: v for k, v in explicit.items() if k != "layer"} == {
        k: v for k, v in default.items() if k != "layer"
    }
    moved = adapter_settings("grace", {"steps": 3, "layer": 0}, model)
    assert moved is not None and moved["steps"] == 3 and moved["layer"] == 0


def test_bad_settings_are_refused_naming_the_field(tiny: Any) -> None:
    model, _ = tiny
    with pytest.raises(InvalidRequestError, match="unknown GraceHparams field") as err:
        adapter_settings("grace", {"no_such_field": 1}, model)
    assert err.value.field == "no_such_field"
    with pytest.raises(InvalidRequestError, match="router_layer") as err:
        adapter_settings("wise", {"layer": 0, "router_layer": 1}, model)
    assert err.value.field == "router_layer"
    with pytest.raises(InvalidRequestError, match="unknown adapter method"):
        adapter_settings("nope", None, model)


def test_a_method_without_a_hyperparameter_type_has_no_known_settings(tiny: Any) -> None:
    model, _ = tiny

    class Bare:
        def __init__(self, model: Any) -> None:
            self.model = model

    register_adapter("bare-settings", Bare)  # type: ignore[arg-type]
    try:
        assert adapter_settings("bare-settings", None, model) is None
    finally:
        del _ADAPTERS["bare-settings"]
