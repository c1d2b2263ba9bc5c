"""From plain mappings (as YAML loads them) and dotted `KEY=VALUE` overrides to a validated `RunConfig`.

Values are coerced to the field's type ("3e-4" and 1e4 where a number is expected, lists to
tuples, `null` for optionals); an unknown key is an error naming the closest known one, and a
key may be overridden once.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml

from qkvlab.arch import ModelConfig
from qkvlab.errors import QkvlabError, check
from qkvlab.train.config.schema import SECTIONS, RunConfig, check_model_keys, unknown_key
from qkvlab.variants import parse_variant


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` names (ints, floats from "3e-4", tuples, optionals), or a one-line error."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except QkvlabError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise QkvlabError(f"config key {key!r} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise QkvlabError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise QkvlabError(f"config key {key!r} must be true or false, got {value!r}")
    if hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise QkvlabError(f"config key {key!r} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise QkvlabError(f"config key {key!r} must be a finite number, got {value!r}")
        if hint is int:
            if float(number) != int(number):
                raise QkvlabError(f"config key {key!r} must be an integer, got {value!r}")
            return int(number)
        return float(number)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise QkvlabError(f"config key {key!r} must be a string, got {value!r}")
    raise QkvlabError(f"config key {key!r} has unsupported type {_type_name(hint)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, coercing every field; unknown keys are errors."""
    label = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QkvlabError(f"config section {label!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            inner = f".{next(iter(value))}" if isinstance(value, dict) and value else ""
            raise unknown_key(dotted + inner)
        if cls is RunConfig and key in SECTIONS:
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.")
        elif cls is RunConfig and key == "model":
            kwargs[key] = _model_overrides(value)
        else:
            kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _model_overrides(data: Any) -> dict:
    data = {} if data is None else data
    check_model_keys(data)
    hints = typing.get_type_hints(ModelConfig)
    return {key: _coerce(value, hints[key], f"model.{key}") for key, value in data.items()}


def config_from_dict(data: dict) -> RunConfig:
    """A validated `RunConfig` from a plain mapping (as YAML loads it).

    `model.variant` is another name for `variant`: given alone it sets the variant; given with a
    different `variant` it is an error.
    """
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and "variant" in model:
        data = {**data, "model": {k: v for k, v in model.items() if k != "variant"}}
        if "variant" in data and data["variant"] is not None:
            check(_variant_name(model["variant"], "model.variant") == _variant_name(data["variant"], "variant"),
                  f"model.variant {model['variant']!r} disagrees with variant {data['variant']!r}; set only variant")
        data["variant"] = model["variant"]
    return _build(RunConfig, data, "")


def _variant_name(value: Any, key: str) -> str:
    check(isinstance(value, str), f"config key {key!r} must be a variant name, got {value!r}")
    return parse_variant(value).name


# Keys that name the same field: an override of one conflicts with an override of the other.
_ALIASES = {"model.variant": "variant"}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split "optim.lr=3e-4" into (["optim", "lr"], value), the value parsed as YAML.

    An empty value is an error (write `KEY=null` for the default).
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    check(sep == "=" and key != "" and all(key.split(".")),
          f"override {text!r} is not KEY=VALUE with a dotted key (e.g. optim.lr=3e-4)")
    check(raw.strip() != "", f"override {text!r} has no value for {key!r}; write {key}=null for the default")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
        value = raw  # e.g. "variant=Q-K=V" style values that YAML would misread
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of the config mapping `data` with dotted KEY=VALUE overrides applied."""
    data = _deep_copy(data)
    seen: dict[str, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        _check_not_set_twice(".".join(path), text, seen)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise QkvlabError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _check_not_set_twice(key: str, text: str, seen: dict[str, str]) -> None:
    """Refuse a second override of one field (directly, through an alias or through its section)."""
    key = _ALIASES.get(key, key)
    for other, earlier in seen.items():
        if key == other or key.startswith(other + ".") or other.startswith(key + "."):
            raise QkvlabError(f"override {text!r} sets {key!r} again (already set by {earlier!r}); give it once")
    seen[key] = text


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    return value
