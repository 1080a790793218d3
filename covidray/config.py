"""Typed stage configs and the command line built from them.

Every stage (``covidray/stages/*.py``) declares one ``*Config`` dataclass: each option,
its default and its help text are written there once, with :func:`option`. The command
line (:mod:`covidray.cli`) is generated from those fields by :func:`add_options` and read
back by :func:`from_args`, so a default can never differ between the CLI, the code and a
stored ``config.json``.

A config may nest another (``ProtocolConfig.train: TrainConfig``); its fields become
options of the outer stage. A nested field named like an outer field is not exposed (the
outer stage sets it), nor is one the outer config lists in its ``DERIVED``; nested fields
of the same name in two siblings (``run`` in train and evaluate) share one option that
sets both.
"""

from __future__ import annotations

import argparse
import hashlib
import dataclasses
import typing
from typing import Any

DEFAULT_SEED = 0  # the one default seed: splits, augmentation, initialisation, sampling
# An operating threshold is the highest reaching this sensitivity (evaluate, calibrate).
DEFAULT_TARGET_SENSITIVITY = 0.95
DEFAULT_BOOTSTRAP = 1000  # bootstrap replicates (patients resampled) for AUC intervals


def seeded_hash(seed: int, key: str) -> int:
    """A 64-bit number fixed by ``seed`` and ``key`` alone (SHA-256, not Python's salted
    ``hash``): the same split, the same augmentation, on every machine and run."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory=None,
           choices=None, required: bool = False, cli: bool = True, flag: str | None = None,
           preset: bool = False, bounds: tuple | None = None):
    """A config field with its CLI help. ``required``: the CLI must give it (no usable
    default); ``cli=False``: set by code only; ``flag``: another option name; ``preset``:
    the field names a preset, ``type(config).preset(name)``, which supplies every option
    the command line does not give; ``bounds``: ``(low, high)``, inclusive, None for no
    bound on that side. :func:`validate` checks choices and bounds."""
    metadata = {"help": help, "choices": choices, "required": required, "cli": cli,
                "flag": flag, "preset": preset, "bounds": bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate(config) -> None:
    """Refuse a value outside its option's ``choices`` or ``bounds``, naming the option:
    every stage config calls this from ``__post_init__``, so a config built in code or read
    back from a stored ``config.json`` is held to what the command line is."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        flag = "--" + (meta.get("flag") or f.name).replace("_", "-")
        if value is None or _is_config(type(value)):
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{flag} {value}: expected one of {', '.join(map(str, meta['choices']))}")
        low, high = meta.get("bounds") or (None, None)
        if (low is not None and value < low) or (high is not None and value > high):
            span = (f"from {low:g} to {high:g}" if low is not None and high is not None else
                    f"at least {low:g}" if low is not None else f"at most {high:g}")
            raise ValueError(f"{flag} {value:g}: must be {span}")


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_config(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _scalar(kind):
    """``int | None`` -> int, and so on."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def cli_fields(config) -> dict[str, list[tuple[tuple[str, ...], dataclasses.Field, Any]]]:
    """Option name -> every (path, field, default) it sets, outer fields first."""
    found: dict[str, list] = {}

    def walk(obj, path: tuple[str, ...], shadowed: set[str]):
        types = _field_types(type(obj))
        fields = [f for f in dataclasses.fields(obj) if f.metadata.get("cli", True)]
        own = {f.name for f in fields if not _is_config(types[f.name])}
        own |= set(getattr(type(obj), "DERIVED", ()))  # nested fields this stage sets itself
        for f in fields:
            value = getattr(obj, f.name)
            if _is_config(types[f.name]):
                walk(value, path + (f.name,), shadowed | own)
            elif f.name not in shadowed:
                found.setdefault(f.metadata.get("flag") or f.name, []).append(
                    (path + (f.name,), f, value))

    walk(config, (), set())
    return found


def add_options(parser: argparse.ArgumentParser, defaults) -> None:
    """Add one option per field of the config instance ``defaults`` (nested ones included).

    Options default to ``None`` ("not given"), so :func:`from_args` can tell a given value
    from a default, which lets a preset chosen on the command line supply the rest.
    """
    types = {}

    def collect(obj):
        for f in dataclasses.fields(obj):
            kind = _field_types(type(obj))[f.name]
            types[id(f)] = kind
            if _is_config(kind):
                collect(getattr(obj, f.name))

    collect(defaults)
    for name, places in cli_fields(defaults).items():
        _, f, value = places[0]
        kind = _scalar(types[id(f)])
        flag = "--" + name.replace("_", "-")
        meta = f.metadata
        shown = "" if meta["required"] else f" (default: {_show(value)})"
        if kind is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None,
                                help=meta["help"] + shown)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None,
                                choices=meta["choices"], required=meta["required"],
                                metavar=None if meta["choices"] else name.upper(),
                                help=meta["help"] + shown)


def from_args(args: argparse.Namespace, defaults):
    """The config ``defaults`` with every option given on the command line applied."""
    fields = cli_fields(defaults)
    given = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    config = defaults
    for name, value in given.items():  # a preset replaces the defaults first ...
        for path, field, _ in fields[name]:
            if field.metadata.get("preset"):
                config = _replace_at(config, path[:-1], preset=value)
    for name, value in given.items():  # ... and the values given win over it
        for path, _, _ in fields[name]:
            config = _replace_at(config, path[:-1], **{path[-1]: value})
    return config


def _replace_at(config, path: tuple[str, ...], preset: str | None = None, **changes):
    """A copy of ``config`` with ``changes`` applied to the nested config at ``path``
    (or, with ``preset``, that nested config replaced by ``type(it).preset(preset, ...)``)."""
    if path:
        inner = getattr(config, path[0])
        return dataclasses.replace(config, **{path[0]: _replace_at(inner, path[1:], preset,
                                                                     **changes)})
    if preset is not None:
        return type(config).preset(preset)
    return dataclasses.replace(config, **changes)


def _show(value) -> str:
    return "none" if value is None else str(value)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, values: dict):
    """Rebuild a (possibly nested) config from :func:`to_dict`'s output; unknown keys fail."""
    types = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**{k: from_dict(types[k], v) if _is_config(types[k]) else v
                  for k, v in values.items()})
