"""pipeline.config: YAML + overrides -> typed dataclasses, one-line errors naming the key."""

from __future__ import annotations  # string annotations must resolve too

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    apply_overrides,
    exit_on_config_error,
    from_dict,
    load_config,
    parse_cli,
    save_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class Attn:
    qk_norm: bool = False
    heads: int = 4


@dataclass(kw_only=True)
class Model:
    width: int = 64
    name: str = "tiny"
    attn: Attn = field(default_factory=Attn)


@dataclass(kw_only=True)
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class Data:
    path: Path | None = None
    resolutions: list[int] = field(default_factory=lambda: [256])
    tags: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    caption: Optional[str] = None
    extra: Any = None


@dataclass(kw_only=True)
class Top:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(kw_only=True)
class Big:
    """A section whose default differs from its class defaults."""

    model: Model = field(default_factory=lambda: Model(width=128, name="big"))


@dataclass(kw_only=True)
class Source:
    path: str


@dataclass(kw_only=True)
class NeedsPath:
    data: Source


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ----------------------------------------------------------------------------- loading


def test_defaults_without_file():
    assert load_config(Top) == Top()


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, """
        model:
          width: 128
          attn: {heads: 8}
        optim:
          lr: 1e-4
          schedule: cosine
        data:
          resolutions: [256, 512]
        seed: 3
    """)
    cfg = load_config(Top, path, ["optim.lr=3e-4", "model.attn.qk_norm=true", "data.path=/tmp/x",
                                  "optim.betas=[0.8, 0.95]", "data.tags=[a, b]", "seed=4"])
    assert cfg.model == Model(width=128, attn=Attn(qk_norm=True, heads=8))
    assert cfg.optim == Optim(lr=3e-4, betas=(0.8, 0.95), schedule="cosine")
    assert isinstance(cfg.optim.lr, float)
    assert cfg.data.path == Path("/tmp/x") and cfg.data.resolutions == [256, 512]
    assert cfg.data.tags == ("a", "b")
    assert cfg.seed == 4


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(Top, write(tmp_path, "")) == Top()
    assert load_config(Top, write(tmp_path, "optim:\nmodel: {}\n", "b.yaml")) == Top()


def test_section_default_factory_is_the_base(tmp_path):
    cfg = load_config(Big, write(tmp_path, "model: {attn: {heads: 2}}"), ["model.attn.qk_norm=true"])
    assert cfg.model == Model(width=128, name="big", attn=Attn(qk_norm=True, heads=2))
    assert load_config(Big, None, ["model.width=8"]).model.name == "big"


def test_float_accepts_int_and_numeric_strings(tmp_path):
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # why the string path exists
    assert from_dict(Optim, yaml.safe_load("lr: 1e-4")).lr == 1e-4
    assert from_dict(Optim, {"lr": 1}).lr == 1.0
    assert load_config(Optim, write(tmp_path, "lr: 1e-4\nbetas: [1, 2e-1]")).betas == (1.0, 0.2)
    assert load_config(Optim, None, ["lr=1e-4"]).lr == 1e-4
    assert load_config(Data, None, ["extra=1e-3"]).extra == 1e-3  # our loader reads 1e-3 as float


def test_containers_and_any():
    cfg = from_dict(Data, {"tags": ["x"], "weights": {"a": 1, "b": "0.5"}, "extra": {"k": [1]}})
    assert cfg.tags == ("x",) and cfg.weights == {"a": 1.0, "b": 0.5} and cfg.extra == {"k": [1]}
    assert from_dict(Data, {"path": None, "caption": None}) == Data()


# ----------------------------------------------------------------------------- errors


def test_unknown_key_top_level_and_nested():
    assert error_of(from_dict, Top, {"sed": 1}) == \
        "unknown key 'sed' (valid keys: data, model, optim, seed)"
    assert error_of(from_dict, Top, {"optim": {"lrr": 1}}) == \
        "unknown key 'optim.lrr' (valid keys: betas, lr, schedule, warmup_steps)"
    assert error_of(from_dict, Top, {"model": {"attn": {"qk": 1}}}) == \
        "unknown key 'model.attn.qk' (valid keys: heads, qk_norm)"


@pytest.mark.parametrize("data, expected", [
    ({"model": {"width": "abc"}}, "'model.width' expects int, got str 'abc'"),
    ({"model": {"width": True}}, "'model.width' expects int, got bool True"),
    ({"model": {"width": 2.5}}, "'model.width' expects int, got float 2.5 (floats are not converted to int)"),
    ({"model": {"width": 2.0}}, "'model.width' expects int, got float 2.0 (floats are not converted to int)"),
    ({"model": {"attn": {"qk_norm": "yes"}}}, "'model.attn.qk_norm' expects bool, got str 'yes'"),
    ({"model": {"attn": {"qk_norm": 1}}}, "'model.attn.qk_norm' expects bool, got int 1"),
    ({"model": {"name": 123}}, "'model.name' expects str, got int 123 (quote it in YAML)"),
    ({"optim": {"lr": "abc"}}, "'optim.lr' expects float, got str 'abc'"),
    ({"optim": {"lr": True}}, "'optim.lr' expects float, got bool True"),
    ({"optim": {"betas": [0.9]}}, "'optim.betas' expects tuple[float, float] (2 items), got 1 items"),
    ({"data": {"resolutions": [256, "x"]}}, "'data.resolutions[1]' expects int, got str 'x'"),
    ({"data": {"resolutions": 256}}, "'data.resolutions' expects list[int], got int 256"),
    ({"data": {"weights": {"a": "x"}}}, "'data.weights.a' expects float, got str 'x'"),
    ({"data": {"path": 3}}, "'data.path' expects Path | None, got int 3"),
    ({"model": 3}, "'model' expects a mapping (a Model section), got int 3"),
    ({"model": [1]}, "'model' expects a mapping (a Model section), got list [1]"),
])
def test_wrong_type_names_the_key(data, expected):
    assert error_of(from_dict, Top, data).startswith(expected)


def test_literal_lists_allowed_values():
    assert error_of(from_dict, Top, {"optim": {"schedule": "linear"}}) == \
        "'optim.schedule' expects one of 'constant', 'cosine', got str 'linear'"


def test_missing_required_key():
    assert error_of(from_dict, NeedsPath, {"data": {}}) == "missing required key 'data.path'"
    assert error_of(from_dict, NeedsPath, {}) == "missing required key 'data'"
    assert from_dict(NeedsPath, {"data": {"path": "x"}}).data.path == "x"


def test_post_init_error_names_the_section():
    assert error_of(from_dict, Top, {"optim": {"lr": -1}}) == "'optim': lr must be > 0, got -1.0"
    assert error_of(from_dict, Top, {"seed": -1}) == "Top: seed must be >= 0, got -1"
    assert error_of(load_config, Top, None, ["optim.lr=0"]) == "'optim': lr must be > 0, got 0.0"


def test_top_level_not_a_mapping():
    assert error_of(from_dict, Top, [1]).startswith("config expects a mapping")


# ----------------------------------------------------------------------------- overrides


def test_overrides_keep_raw_text_for_str_and_path():
    data = apply_overrides(Top, {}, ["model.name=123", "data.path=007", "data.caption=true",
                                     "optim.schedule=cosine"])
    assert data == {"model": {"name": "123"}, "data": {"path": "007", "caption": "true"},
                    "optim": {"schedule": "cosine"}}
    cfg = load_config(Top, None, ["data.path=null", "data.caption=~", "model.name=null"])
    assert cfg.data.path is None and cfg.data.caption is None and cfg.model.name == "null"


def test_overrides_parse_yaml_for_other_types():
    data = apply_overrides(Top, {}, ["data.resolutions=[1,2]", "data.extra=null", "model.width=7",
                                     "model.attn.qk_norm=false", "data.weights={a: 1}"])
    assert data == {"data": {"resolutions": [1, 2], "extra": None, "weights": {"a": 1}},
                    "model": {"width": 7, "attn": {"qk_norm": False}}}
    assert error_of(load_config, Top, None, ["model.width=abc"]) == \
        "'model.width' expects int, got str 'abc'"


def test_apply_overrides_does_not_mutate_input():
    data = {"model": {"width": 1, "attn": {"heads": 2}}}
    out = apply_overrides(Top, data, ["model.attn.heads=3", "optim.lr=1"])
    assert data == {"model": {"width": 1, "attn": {"heads": 2}}}
    assert out == {"model": {"width": 1, "attn": {"heads": 3}}, "optim": {"lr": 1}}


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1", "unknown key 'optim.lrr' (valid keys: betas, lr, schedule, warmup_steps)"),
    ("sed=1", "unknown key 'sed' (valid keys: data, model, optim, seed)"),
    ("model.attn.qk=1", "unknown key 'model.attn.qk' (valid keys: heads, qk_norm)"),
    ("foo", "override 'foo' must look like section.key=value"),
    ("=3", "override '=3' must look like section.key=value"),
    ("seed.x=1", "cannot set 'seed.x': 'seed' is not a section (it holds int)"),
    ("model=3", "'model' is a section; override its keys instead, e.g. model.attn=..."),
    ("model.width=[1", "override 'model.width': cannot parse '[1'"),
])
def test_bad_overrides(override, expected):
    assert error_of(apply_overrides, Top, {}, [override]).startswith(expected)


def test_override_into_non_mapping_section():
    assert error_of(apply_overrides, Top, {"model": 3}, ["model.width=1"]) == \
        "cannot set 'model.width': 'model' expects a mapping, got int 3"


# ----------------------------------------------------------------------------- files


def test_missing_file(tmp_path):
    message = error_of(load_config, Top, tmp_path / "nope.yaml")
    assert message == f"cannot read config file '{tmp_path / 'nope.yaml'}': No such file or directory"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  width: 1\n  name: [unclosed\nseed: 1\n")
    message = error_of(load_config, Top, path)
    assert message.startswith(f"invalid YAML in '{path}': line ")


def test_duplicate_yaml_key(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1\n  lr: 2\n")
    assert error_of(load_config, Top, path) == \
        f"invalid YAML in '{path}': line 3, column 3: found duplicate key 'lr'"


def test_yaml_top_level_list(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    assert error_of(load_config, Top, path) == \
        f"config file '{path}' must hold a mapping (key: value) at top level, got list"


def test_to_dict_is_yaml_safe():
    cfg = from_dict(Top, {"data": {"path": "/x", "tags": ["a"]}})
    plain = to_dict(cfg)
    assert plain["data"]["path"] == "/x" and plain["data"]["tags"] == ["a"]
    assert plain["optim"]["betas"] == [0.9, 0.999]
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


def test_save_load_round_trip(tmp_path):
    cfg = load_config(Top, None, ["optim.lr=3e-10", "data.path=/data/x", "optim.betas=[0.5, 0.6]",
                                  "model.name=123", "data.weights={a: 0.5}", "data.tags=[p]",
                                  "model.attn.qk_norm=true", "optim.schedule=cosine"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(Top, path) == cfg
    assert list(yaml.safe_load(path.read_text())) == ["model", "optim", "data", "seed"]  # not sorted
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temporary left
    save_config(Top(), path)  # replaces
    assert load_config(Top, path) == Top()


# ----------------------------------------------------------------------------- CLI


def test_exit_on_config_error_only_catches_config_errors(capsys):
    with pytest.raises(SystemExit) as info, exit_on_config_error("prog"):
        raise ConfigError("bad\nthing")
    assert info.value.code == 2
    assert capsys.readouterr().err == "prog: config error: bad thing\n"
    with pytest.raises(KeyError), exit_on_config_error("prog"):
        raise KeyError("not a config error")


def test_parse_cli_in_process(tmp_path, capsys):
    path = write(tmp_path, "optim: {lr: 1e-3}\n")
    cfg = parse_cli(Top, ["optim.warmup_steps=5", "--config", str(path), "seed=2"], prog="t")
    assert cfg.optim == Optim(lr=1e-3, warmup_steps=5) and cfg.seed == 2
    with pytest.raises(SystemExit) as info:
        parse_cli(Top, ["optim.lrr=1"], prog="pipeline.train")
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "pipeline.train: config error: unknown key 'optim.lrr' "
        "(valid keys: betas, lr, schedule, warmup_steps)\n")


CLI_SCRIPT = """
import sys
from dataclasses import dataclass, field
from pipeline.config import parse_cli

@dataclass(kw_only=True)
class Optim:
    lr: float = 1e-4

@dataclass(kw_only=True)
class Cfg:
    optim: Optim = field(default_factory=Optim)
    steps: int = 10

cfg = parse_cli(Cfg, sys.argv[1:], prog="pipeline.toy")
print(cfg.optim.lr, cfg.steps)
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI_SCRIPT, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_subprocess_bad_key_is_one_line_exit_2():
    proc = run_cli("optim.lrr=3e-4", "steps=100")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "pipeline.toy: config error: unknown key 'optim.lrr' (valid keys: lr)"]


def test_cli_subprocess_ok(tmp_path):
    path = write(tmp_path, "steps: 7\n")
    proc = run_cli("--config", str(path), "optim.lr=3e-4")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "0.0003 7\n", "")
    proc = run_cli("--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
