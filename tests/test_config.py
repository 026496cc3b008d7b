"""Config layering: defaults -> YAML -> overrides; unknown keys and bad types are errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from pathvlm.config import apply_overrides, from_dict, load_config, save_config, to_dict
from pathvlm.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class RunConfig:
    name: str = "run"
    steps: int = 10
    mixed_precision: str | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    tags: list[str] = field(default_factory=list)


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 50, "optim": {"lr": 0.01}}))
    cfg = load_config(RunConfig, path, ["optim.lr=0.5", "tags=[a, b]", "name=x"])
    assert cfg.steps == 50
    assert cfg.optim.lr == 0.5
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.tags == ["a", "b"]
    assert cfg.name == "x"


def test_unknown_key_in_yaml_names_the_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(RunConfig, path)


def test_unknown_override_key_is_an_error():
    with pytest.raises(ConfigError, match="stepz"):
        load_config(RunConfig, None, ["stepz=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        from_dict(RunConfig, {"steps": "many"})
    with pytest.raises(ConfigError, match="optim.betas"):
        from_dict(RunConfig, {"optim": {"betas": [0.9]}})


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_optional_and_null():
    cfg = load_config(RunConfig, None, ["mixed_precision=bf16"])
    assert cfg.mixed_precision == "bf16"
    cfg = load_config(RunConfig, None, ["mixed_precision=null"])
    assert cfg.mixed_precision is None


def test_save_config_round_trips_and_writes_meta(tmp_path):
    cfg = load_config(RunConfig, None, ["steps=7", "optim.lr=0.2"])
    path = save_config(cfg, tmp_path / "run")
    again = from_dict(RunConfig, yaml.safe_load(path.read_text()))
    assert again == cfg
    meta = (tmp_path / "run" / "meta.json").read_text()
    assert "pathvlm_version" in meta and "git_commit" in meta  # tests run in a checkout
    assert to_dict(again)["optim"]["betas"] == [0.9, 0.999]


def test_exponent_without_dot_is_a_float():
    assert load_config(RunConfig, None, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_bare_yaml_no_reads_as_the_literal_no(tmp_path):
    from pathvlm.train.config import TrainConfig

    (tmp_path / "c.yaml").write_text("mixed_precision: no\n")
    cfg = load_config(TrainConfig, tmp_path / "c.yaml", [])
    assert cfg.mixed_precision == "no"
    cfg = load_config(TrainConfig, None, ["mixed_precision=no"])
    assert cfg.mixed_precision == "no"
