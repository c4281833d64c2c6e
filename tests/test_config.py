"""Dataclasses <-> YAML: round trips, named errors for unknown keys and wrong types, dotted overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from tokensieve.config import apply_overrides, from_dict, load_config, save_config, to_dict
from tokensieve.errors import TokensieveError


@dataclass
class Optim:
    lr_merger: float = 1e-4
    lr_pruner: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Train:
    steps: int = 100
    schedule: Literal["exponential", "linear"] = "exponential"
    layers: list[int] = field(default_factory=lambda: [10, 20, 31])
    optim: Optim = field(default_factory=Optim)
    weights: dict[str, float] = field(default_factory=lambda: {"kl": 1.0})


@dataclass
class Root:
    name: str = "run"
    verbose: bool = False
    train: Train = field(default_factory=Train)


@dataclass
class Required:
    size: int


def test_missing_keys_take_defaults_and_nested_values_are_read():
    cfg = from_dict(Root, {"train": {"steps": 5, "optim": {"lr_pruner": 2}}})
    assert cfg == Root(train=Train(steps=5, optim=Optim(lr_pruner=2.0)))
    assert isinstance(cfg.train.optim.lr_pruner, float)
    assert from_dict(Root, {}) == Root()


def test_yaml_round_trip_equals(tmp_path):
    cfg = Root(name="x", verbose=True, train=Train(steps=7, schedule="linear", layers=[1, 2],
                                                  optim=Optim(lr_merger=3e-5, lr_pruner=0.5, betas=(0.8, 0.95)),
                                                  weights={"kl": 0.5, "mse": 2.0}))
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    assert load_config(Root, path) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.yaml"]


def test_to_dict_gives_plain_lists():
    data = to_dict(Root())
    assert data["train"]["optim"]["betas"] == [0.9, 0.999]
    assert data["train"]["layers"] == [10, 20, 31]
    assert data["train"]["optim"] == {"lr_merger": 1e-4, "lr_pruner": None, "betas": [0.9, 0.999]}


@pytest.mark.parametrize("data, key, level", [
    ({"nmae": "x"}, "nmae", "the top level"),
    ({"train": {"optim": {"lr_mergr": 1.0}}}, "train.optim.lr_mergr", "'train.optim'"),
])
def test_unknown_key_is_named_with_valid_keys(data, key, level):
    with pytest.raises(TokensieveError) as err:
        from_dict(Root, data)
    message = str(err.value)
    assert f"unknown config key '{key}'" in message
    assert f"valid keys at {level}" in message


def test_unknown_key_suggests_the_close_match():
    with pytest.raises(TokensieveError, match=r"did you mean 'lr_merger'\?.*lr_merger, lr_pruner, betas"):
        from_dict(Root, {"train": {"optim": {"lr_mergr": 1.0}}})
    with pytest.raises(TokensieveError) as err:
        from_dict(Root, {"zzzzzz": 1})
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("data, key, expected", [
    ({"train": {"steps": True}}, "train.steps", "int"),  # bool is not an int
    ({"train": {"steps": 1.5}}, "train.steps", "int"),
    ({"train": {"optim": {"lr_merger": "1e-3"}}}, "train.optim.lr_merger", "float"),  # a string is not a float
    ({"train": {"optim": {"lr_pruner": "fast"}}}, "train.optim.lr_pruner", "float | None"),
    ({"verbose": 1}, "verbose", "bool"),
    ({"name": 3}, "name", "str"),
    ({"train": {"layers": [1, "two"]}}, r"train.layers\[1\]", "int"),
    ({"train": {"layers": 3}}, "train.layers", r"list\[int\]"),
    ({"train": {"weights": {"kl": "high"}}}, "train.weights.kl", "float"),
    ({"train": "fast"}, "train", r"a mapping \(Train\)"),
])
def test_wrong_type_names_key_type_and_value(data, key, expected):
    with pytest.raises(TokensieveError, match=rf"config key '{key}' expects {expected}, got"):
        from_dict(Root, data)


def test_literal_and_tuple_length_are_checked():
    with pytest.raises(TokensieveError, match=r"'train.schedule' must be one of 'exponential', 'linear', got 'cosine'"):
        from_dict(Root, {"train": {"schedule": "cosine"}})
    with pytest.raises(TokensieveError, match=r"'train.optim.betas' expects 2 items"):
        from_dict(Root, {"train": {"optim": {"betas": [0.9]}}})


def test_missing_required_key_is_named():
    with pytest.raises(TokensieveError, match="missing config key 'size'"):
        from_dict(Required, {})
    assert from_dict(Required, {"size": 3}) == Required(3)


def test_overrides_set_nested_keys_lists_and_exponent_floats():
    data = {"train": {"steps": 5}}
    out = apply_overrides(data, ["train.optim.lr_merger=1e-3", "train.layers=[4, 8]", "verbose=true",
                                 "train.optim.lr_pruner=2.5E+2", "name=plain"])
    assert out == {"name": "plain", "verbose": True,
                   "train": {"steps": 5, "layers": [4, 8], "optim": {"lr_merger": 1e-3, "lr_pruner": 250.0}}}
    assert data == {"train": {"steps": 5}}  # the input is not changed
    cfg = from_dict(Root, out)
    assert cfg.train.optim.lr_merger == 1e-3 and cfg.train.layers == [4, 8] and cfg.verbose is True


def test_override_can_reset_an_optional_to_none_and_replace_an_empty_section():
    assert apply_overrides({"train": None}, ["train.optim.lr_pruner=null"]) == {"train": {"optim": {"lr_pruner": None}}}


@pytest.mark.parametrize("override", ["train.steps", "=3", "train..steps=3"])
def test_malformed_override_is_named(override):
    with pytest.raises(TokensieveError, match=f"malformed override '{override}'"):
        apply_overrides({}, [override])


def test_override_through_a_non_mapping_is_an_error():
    with pytest.raises(TokensieveError, match="'train.steps' is not a mapping"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


def test_load_config_reads_yaml_then_applies_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  steps: 9\n  optim:\n    lr_merger: 1e-3\n")
    cfg = load_config(Root, path, ["train.steps=11"])
    assert cfg.train.steps == 11 and cfg.train.optim.lr_merger == 1e-3
    assert load_config(Root, None, ["name=y"]) == Root(name="y")


def test_empty_file_means_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(Root, path) == Root()


def test_load_config_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(TokensieveError, match=f"{re.escape(str(missing))}.*does not exist"):
        load_config(Root, missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(TokensieveError, match=f"{re.escape(str(broken))} is not valid YAML"):
        load_config(Root, broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(TokensieveError, match=f"{re.escape(str(listed))} must hold a mapping"):
        load_config(Root, listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stpes: 3\n")
    with pytest.raises(TokensieveError, match=f"{re.escape(str(typo))}: unknown config key 'train.stpes'"):
        load_config(Root, typo)
