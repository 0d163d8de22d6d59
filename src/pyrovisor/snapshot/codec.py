"""Frozen state dataclasses to JSON-compatible values and back, strictly, guided by their type hints."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from pyrovisor.errors import StateError

T = TypeVar("T")


def encode(value: object) -> Any:
    """A JSON-compatible copy of `value` (dataclasses become objects, bytes become {"base64": ...})."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: encode(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return encode(value.value)
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): encode(item) for key, item in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(kind: type[T], data: Any, where: str = "state") -> T:
    """Rebuild a `kind` from `encode`'s output; any mismatch raises StateError naming the field."""
    result: T = _decode(kind, data, where)
    return result


def _decode(kind: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(option, data, where)
            except StateError as exc:
                errors.append(exc.reason)
        raise StateError(where, "; ".join(errors) or "does not match")
    if origin is tuple:
        arguments = typing.get_args(kind)
        items = _expect(list, data, where)
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_decode(arguments[0], item, f"{where}[{i}]") for i, item in enumerate(items))
        if len(items) != len(arguments):
            raise StateError(where, f"expected {len(arguments)} items, found {len(items)}")
        return tuple(_decode(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(arguments, items,
                                                                                            strict=True)))
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        return [_decode(item_kind, item, f"{where}[{i}]") for i, item in enumerate(_expect(list, data, where))]
    if origin is dict:
        key_kind, value_kind = typing.get_args(kind)
        mapping = _expect(dict, data, where)
        return {_decode(key_kind, key, where): _decode(value_kind, item, f"{where}.{key}") for key, item in mapping.items()}
    if dataclasses.is_dataclass(kind):
        return _decode_dataclass(kind, data, where)
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(data)
        except ValueError:
            raise StateError(where, f"{data!r} is not a valid {kind.__name__}") from None
    if kind is bytes:
        mapping = _expect(dict, data, where)
        if set(mapping) != {"base64"} or not isinstance(mapping["base64"], str):
            raise StateError(where, "expected {\"base64\": ...}")
        try:
            return base64.b64decode(mapping["base64"], validate=True)
        except binascii.Error:
            raise StateError(where, "invalid base64") from None
    if kind is Path:
        return Path(_expect(str, data, where))
    if kind is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise StateError(where, f"expected a number, found {type(data).__name__}")
        return float(data)
    if kind is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise StateError(where, f"expected an integer, found {type(data).__name__}")
        return data
    if kind in (str, bool):
        return _expect(kind, data, where)
    if kind is type(None):
        if data is not None:
            raise StateError(where, "expected null")
        return None
    raise StateError(where, f"cannot decode type {kind!r}")


def _decode_dataclass(kind: Any, data: Any, where: str) -> Any:
    mapping = _expect(dict, data, where)
    hints = typing.get_type_hints(kind)
    fields = {field.name: field for field in dataclasses.fields(kind) if field.init}
    unknown = set(mapping) - set(fields)
    if unknown:
        raise StateError(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    values = {}
    for name, field in fields.items():
        if name in mapping:
            values[name] = _decode(hints[name], mapping[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise StateError(where, f"missing field {name}")
    try:
        return kind(**values)
    except (TypeError, ValueError) as exc:
        raise StateError(where, str(exc)) from None


def _expect(kind: type[T], data: Any, where: str) -> T:
    if not isinstance(data, kind) or (kind is int and isinstance(data, bool)):
        raise StateError(where, f"expected {kind.__name__}, found {type(data).__name__}")
    return data
