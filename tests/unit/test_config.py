"""Each kind of config error gives one line naming the key."""
import pytest

from moe_sys.cli import main
from moe_sys.config import ConfigError, load_config, validate, yaml_io


def _error(raw, **kw):
    with pytest.raises(ConfigError) as info:
        validate(raw, **kw)
    return str(info.value)


def test_unknown_key_names_full_path_and_closest_name():
    assert _error({"moe": {"topk": 2}}) == "moe.topk: unknown key; did you mean 'top_k'?"
    assert _error({"data": {"domains": [{"name": "a", "pth": "x"}]}}) == \
        "data.domains.0.pth: unknown key; did you mean 'path'?"
    assert _error({"trian": {}}) == "trian: unknown key; did you mean 'train'?"


def test_bad_type_names_key_and_value():
    msg = _error({"train": {"lr": "fast"}})
    assert msg.startswith("train.lr: ") and "'fast'" in msg


def test_divisibility_and_cross_field_rules():
    assert _error({"moe": {"num_experts": 6}, "parallel": {"ep_size": 4, "procs": 4}}) == \
        "moe.num_experts: 6 is not divisible by parallel.ep_size=4"
    assert _error({"parallel": {"ep_size": 2}}, world_size=3) == \
        "parallel.ep_size: world size 3 is not divisible by ep_size=2"
    assert _error({"moe": {"num_experts": 2, "top_k": 3}}) == "moe.top_k: 3 exceeds moe.num_experts=2"


def test_bad_paths():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")
    msg = _error({"data": {"domains": [{"name": "mine", "path": "/no/such/prefix"}]}})
    assert msg.startswith("data.domains.0.path: no indexed dataset at '/no/such/prefix'")


def test_overrides_parse_yaml_values_and_reject_bad_syntax(tmp_path):
    cfg = load_config(None, ["moe.top_k=1", "moe.capacity_factor=1.25", "data.domains.1.weight=2"])
    assert cfg.moe.top_k == 1 and cfg.moe.capacity_factor == 1.25 and cfg.data.domains[1].weight == 2
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["moe.top_k"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(None, ["data.domains.9.weight=1"])


def test_cli_prints_resolved_config_and_one_line_errors(capsys):
    assert main(["config", "configs/tiny.yaml", "--set", "moe.top_k=1"]) == 0
    assert "top_k: 1" in capsys.readouterr().out
    assert main(["config", "configs/tiny.yaml", "--set", "moe.top_kk=1"]) == 2
    assert capsys.readouterr().err.strip() == "config error: moe.top_kk: unknown key; did you mean 'top_k'?"


def test_what_strict_reading_still_accepts(tmp_path):
    """YAML 1.2 floats (1e-3), integers for floats, a UTF-8 BOM, merge keys overridden in their mapping."""
    cfg = load_config(None, ["train.lr=1e-3", "moe.capacity_factor=2", "model.rope_theta=1E6"])
    assert cfg.train.lr == 1e-3 and cfg.moe.capacity_factor == 2.0 and cfg.model.rope_theta == 1e6
    path = tmp_path / "c.yaml"
    path.write_bytes("\ufefftrain: {lr: 1e-2, steps: 9}\n".encode("utf-8"))
    assert load_config(str(path)).train.lr == 1e-2
    assert yaml_io.parse("a: &d {x: 1, y: 2}\nb:\n  <<: *d\n  x: 3\n", "t")["b"] == {"x": 3, "y": 2}
