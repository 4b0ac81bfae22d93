"""Config plumbing: dicts, JSON/TOML files and overrides into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import pytest

from rlhf_jax.configs import ConfigError, from_dict, load_config, to_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    schedule: Literal["constant", "cosine"] = "constant"
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"Inner.lr must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = dataclasses.field(default_factory=Inner)
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[str, float] = ("a", 1.0)
    flag: bool = False
    maybe: Inner | None = None


def test_from_dict_nested_and_conversions():
    cfg = from_dict(
        Outer,
        {"name": "x", "inner": {"lr": 1, "steps": 3.0, "schedule": "cosine"}, "sizes": [4, 5, 6], "pair": ["b", 2]},
    )
    assert cfg == Outer(name="x", inner=Inner(lr=1.0, steps=3, schedule="cosine"), sizes=(4, 5, 6), pair=("b", 2.0))
    assert isinstance(cfg.inner.lr, float) and isinstance(cfg.inner.steps, int)
    assert isinstance(cfg.sizes, tuple)
    assert from_dict(Outer, {"name": "y", "maybe": {"steps": 7}}).maybe == Inner(steps=7)


def test_to_dict_round_trip_and_json():
    cfg = Outer(name="z", inner=Inner(clip=0.5), sizes=(3,), maybe=Inner(lr=2.0))
    data = to_dict(cfg)
    assert data == {
        "name": "z",
        "inner": {"lr": 1e-3, "steps": 10, "schedule": "constant", "clip": 0.5},
        "sizes": [3],
        "pair": ["a", 1.0],
        "flag": False,
        "maybe": {"lr": 2.0, "steps": 10, "schedule": "constant", "clip": None},
    }
    assert from_dict(Outer, json.loads(json.dumps(data))) == cfg


def test_unknown_key_names_dotted_path_and_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'config\.inner\.lrr'.*clip, lr, schedule, steps"):
        from_dict(Outer, {"name": "x", "inner": {"lrr": 1.0}})


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key 'config\.name'"):
        from_dict(Outer, {})


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"name": 3}, r"config\.name: expected str, got 3"),
        ({"name": "x", "inner": {"steps": 2.5}}, r"config\.inner\.steps: expected int, got 2\.5"),
        ({"name": "x", "inner": {"steps": True}}, r"config\.inner\.steps: expected int, got True"),
        ({"name": "x", "flag": "yes"}, r"config\.flag: expected bool, got 'yes'"),
        ({"name": "x", "inner": {"schedule": "linear"}}, r"config\.inner\.schedule: expected one of \['constant', 'cosine'\]"),
        ({"name": "x", "sizes": [1, "a"]}, r"config\.sizes\[1\]: expected int"),
        ({"name": "x", "pair": ["a"]}, r"config\.pair: expected 2 items"),
        ({"name": "x", "inner": 5}, r"config\.inner: expected Inner, got 5"),
        ({"name": "x", "inner": {"clip": "big"}}, r"config\.inner\.clip: expected float, got 'big'"),
    ],
)
def test_wrong_types_name_key_type_and_value(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Outer, data)


def test_post_init_error_is_prefixed_with_path():
    with pytest.raises(ConfigError, match=r"config\.inner: Inner\.lr must be > 0, got -1\.0"):
        from_dict(Outer, {"name": "x", "inner": {"lr": -1}})


def test_load_json_and_toml_with_overrides(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"name": "j", "inner": {"steps": 4}}))
    (tmp_path / "c.toml").write_text('name = "t"\nsizes = [7, 8]\n[inner]\nsteps = 4\n')
    overrides = ["inner.lr=2e-5", "inner.schedule=cosine", "flag=true", "maybe.steps=9", "name=123", "inner.clip=null"]
    cfg_json = load_config(Outer, tmp_path / "c.json", overrides)
    cfg_toml = load_config(Outer, str(tmp_path / "c.toml"), overrides)
    expected = Outer(name="123", inner=Inner(lr=2e-5, steps=4, schedule="cosine"), flag=True, maybe=Inner(steps=9))
    assert cfg_json == expected
    assert cfg_toml == dataclasses.replace(expected, sizes=(7, 8))
    assert load_config(Outer, None, ["name=n", "sizes=[1,2,3]"]) == Outer(name="n", sizes=(1, 2, 3))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("inner.lrr=1", r"override 'inner\.lrr=1': unknown key 'inner\.lrr'.*clip, lr, schedule, steps"),
        ("bogus=1", r"override 'bogus=1': unknown key 'bogus'.*valid keys of <top level>"),
        ("name.sub=1", r"override 'name\.sub=1': 'name' is a str, not a config section"),
        ("inner.lr", r"override 'inner\.lr': expected the form a\.b\.c=value"),
    ],
)
def test_bad_override_names_the_override(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(Outer, None, ["name=x", override])


def test_override_with_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"config\.inner\.steps: expected int, got 'many'"):
        load_config(Outer, None, ["name=x", "inner.steps=many"])


def test_json_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "name": "x",\n  "inner": {"lr": }\n}\n')
    with pytest.raises(ConfigError, match=rf"{path}:3:\d+: invalid JSON"):
        load_config(Outer, path)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[inner]\nlr = = 3\n')
    with pytest.raises(ConfigError, match=rf"{path}: invalid TOML: .*line 3"):
        load_config(Outer, path)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.json"):
        load_config(Outer, tmp_path / "missing.json")
    (tmp_path / "c.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config file type '\.yaml'"):
        load_config(Outer, tmp_path / "c.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json: the top level must be an object"):
        load_config(Outer, tmp_path / "list.json")


def test_key_error_in_file_names_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"name": "x", "extra": 1}))
    with pytest.raises(ConfigError, match=r"unknown key 'config \(.*c\.json\)\.extra'"):
        load_config(Outer, path)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    a: int
    b: str = "class"


@dataclasses.dataclass(frozen=True)
class _Holder:
    leaf: _Leaf = _Leaf(a=7, b="field")


def test_partial_table_overrides_the_field_default_not_the_class_defaults():
    assert from_dict(_Holder, {"leaf": {"b": "set"}}).leaf == _Leaf(a=7, b="set")
    assert from_dict(_Holder, {}).leaf == _Leaf(a=7, b="field")
