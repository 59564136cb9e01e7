"""Type checks and coercions for configuration values (dataclass fields and config files):
YAML reads ``1e-3`` as a string, JSON has no ints vs floats; both must end up typed."""
from __future__ import annotations

import difflib
import numbers
import typing
from typing import Any, Iterable


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and what was expected."""


def did_you_mean(kind: str, name: str, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    lower = {k.lower(): k for k in known}
    close = [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=3)]
    return ConfigError(f"unknown {kind} {name!r}" +
                       (f"; did you mean {close}?" if close else f"; known: {known}"))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp, where: str) -> Any:
    """``value`` as type ``tp`` (int, float, bool, str, Optional/Union of them, list, dict,
    Any); numbers given as strings are parsed; anything else raises :class:`ConfigError`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def coerce_like(value: Any, default: Any, where: str) -> Any:
    """Coerce ``value`` to the type of a keyword's ``default`` (int, float, bool; others pass)."""
    if isinstance(default, bool):
        return coerce(value, bool, where)
    if isinstance(default, float):
        return coerce(value, float, where)
    if isinstance(default, int) and not (isinstance(value, float) and not value.is_integer()):
        return coerce(value, int, where)
    return value
