"""Typed settings from YAML plus ``--set section.key=value`` overrides, shared by every stage.

    cfg = load_config(PretrainConfig, "jobs/configs/pretrain_tiny.yaml", ["train.max_steps=50"])
    worker_cfg = PretrainConfig.from_dict(cfg.to_dict())     # what crosses the Ray boundary

Each stage defines its sections next to its code as ``Settings`` subclasses: pydantic models that
refuse unknown keys and check every assignment; a check that spans fields is a ``model_validator``
raising ``ValueError`` with a message that names the key and the fix. This module reads YAML,
applies overrides, names the closest valid key for a typo, and words pydantic's errors as one line
per problem, all on the driver before any worker starts. ``AbsolutePath`` fields are made absolute
where the config is built (workers run elsewhere).
"""

from __future__ import annotations

import copy
import difflib
import os
import typing
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator


def _text(value):
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _absolute(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().absolute())


# a path relative to where the command runs, made absolute (workers run elsewhere); URLs kept as they are
AbsolutePath = Annotated[str, BeforeValidator(_text), AfterValidator(_absolute)]


class Settings(BaseModel):
    """One section of a config (or a whole config made of sections)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_dict(self) -> dict:
        """Plain JSON-able values: what crosses the Ray boundary and what YAML files hold."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, values: dict):
        return build(cls, values)

    @model_validator(mode="after")
    def _check_default_sections(self):
        """A section left out takes its defaults unchecked (``model_construct``): check it here, so that a
        config without a ``data`` section says that data.corpus is empty."""
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Settings) and name not in self.model_fields_set:
                try:
                    type(value).model_validate(value.model_dump())
                except ValidationError as exc:
                    raise ValueError(describe_errors(exc)) from None
        return self


def build(cls: type[Settings], values: dict, *, source: str = "config"):
    """``cls`` from plain values; unknown keys and invalid values raise one ``ValueError`` naming them."""
    if not isinstance(values, dict):
        raise ValueError(f"{source} must hold a mapping of sections, got {values!r}")
    problems = unknown_keys(cls, values)
    if problems:
        raise ValueError("; ".join(problems))
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise ValueError(describe_errors(exc)) from None


def load_config(cls: type[Settings], path: str | Path | None = None, overrides: list[str] | None = None, *,
                values: dict | None = None):
    """Build ``cls`` from a YAML file (or a dict of ``values``) and ``section.key=value`` overrides (values
    parsed as YAML)."""
    values = copy.deepcopy(values) if values is not None else {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: use section.key=value")
        set_override(values, cls, key.split("."), yaml.safe_load(raw), item)
    return build(cls, values, source=str(path or "config"))


def set_override(values: dict, cls, parts: list[str], value, item: str) -> None:
    """Put one ``--set`` value into the raw config. Once the path reaches a mapping field (``dict[str, ...]``),
    the rest of the key is one entry of it, dots and all (``space.optim.lr``); ``null`` removes that entry."""
    target, model = values, cls
    for i, part in enumerate(parts[:-1]):
        hint = model.model_fields[part].annotation if _is_settings(model) and part in model.model_fields else None
        if typing.get_origin(hint) is dict:
            entries = target.get(part) or {}
            target[part] = entries
            entry = ".".join(parts[i + 1:])
            if value is None:
                entries.pop(entry, None)
            else:
                entries[entry] = value
            return
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"--set {item!r}: {part!r} is not a section")
        model = hint
    target[parts[-1]] = value


def unknown_keys(cls, values: dict, prefix: str = "") -> list[str]:
    """Keys that ``cls`` does not have, each with the closest known key (a typo would otherwise be refused
    with no hint, or in a looser loader silently do nothing)."""
    problems = []
    known = list(cls.model_fields)
    for key, value in values.items():
        if key not in cls.model_fields:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            problems.append(f"unknown config key {prefix}{key}: {hint}known in {prefix.rstrip('.') or 'the top level'}: "
                            f"{', '.join(known)}")
            continue
        hint = cls.model_fields[key].annotation
        if _is_settings(hint) and isinstance(value, dict):
            problems += unknown_keys(hint, value, f"{prefix}{key}.")
    return problems


def describe_errors(exc: ValidationError) -> str:
    """pydantic's errors as ``section.key: what is wrong (got VALUE)``; our own checks' messages as they are."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "value_error":  # a ValueError from a check: its message names the key and the fix
            lines.append(str(error["ctx"]["error"]) if "ctx" in error else error["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{where or 'config'}: {error['msg'][0].lower()}{error['msg'][1:]} (got {error['input']!r})")
    return "; ".join(dict.fromkeys(lines))


def _is_settings(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, Settings)
