"""Where run configs come from and go to: YAML files, the packaged configs, run directories."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import yaml

from qkvlab.atomic import atomic_write_text
from qkvlab.errors import QkvlabError, check
from qkvlab.train.config.overrides import apply_overrides, config_from_dict
from qkvlab.train.config.schema import RunConfig


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file (or in a run directory's config.yaml)."""
    path = Path(path)
    if path.is_dir():
        check((path / "config.yaml").is_file(),
              f"{str(path)!r} is a directory but not a run directory (it has no config.yaml)")
        path = path / "config.yaml"
    check(path.is_file(), f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise QkvlabError(f"config file {str(path)!r} cannot be read: {reason}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise QkvlabError(f"config file {str(path)!r} is not valid YAML{where}") from None
    data = {} if data is None else data
    check(isinstance(data, dict), f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config from YAML (or start empty) and apply dotted overrides.

    `path` may be a run directory: its stored config, writing to that directory (continue or
    extend the run) unless an override sets another `train.out_dir`.
    """
    data = read_yaml(path) if path is not None else {}
    if path is not None and Path(path).is_dir():
        train = data.get("train")
        data["train"] = {**(train if isinstance(train, dict) else {}), "out_dir": str(path)}
    return config_from_dict(apply_overrides(data, list(overrides)))


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write `cfg` as YAML, atomically (a run directory's config.yaml)."""
    return atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def packaged_configs() -> dict[str, Path]:
    """The configs shipped in `qkvlab/configs/`, by name (file stem)."""
    root = Path(__file__).resolve().parents[2] / "configs"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def find_config(name: str) -> Path:
    """A config file path, a run directory, or the name of a packaged config ("lm-300m")."""
    path = Path(name)
    if path.is_file() or path.is_dir():
        return path
    shipped = packaged_configs()
    if name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(path.stem, list(shipped), n=1)
    hint = f"; did you mean the packaged config {close[0]!r}?" if close else \
        f"; packaged configs: {', '.join(shipped) or 'none'}"
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise QkvlabError(f"config file {name!r} does not exist")
    raise QkvlabError(f"config {name!r} is neither a file nor a packaged config{hint}")
