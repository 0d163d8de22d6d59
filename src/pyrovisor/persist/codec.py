"""Frozen state dataclasses to JSON-compatible values and back, strictly, guided by their type hints."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import types
import typing
from collections.abc import Callable
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
    result: T = _decoder(typing.cast(Any, kind))(data, where)
    return result


Decoder = Callable[[Any, str], Any]


def prepare_decoder(kind: type) -> None:
    """Build the decoders for `kind` and everything it contains ahead of time."""
    _decoder(typing.cast(Any, kind))


@functools.cache
def _decoder(kind: Any) -> Decoder:
    """A function that decodes values of type `kind`, built once per type (restores must be fast)."""
    if kind is Any:
        return _decode_json_value
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return _union_decoder(typing.get_args(kind))
    if origin is tuple:
        arguments = typing.get_args(kind)
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return _sequence_decoder(_decoder(arguments[0]), tuple)
        return _fixed_tuple_decoder(tuple(_decoder(argument) for argument in arguments))
    if origin is list:
        return _sequence_decoder(_decoder(typing.get_args(kind)[0]), list)
    if origin is dict:
        key_kind, value_kind = typing.get_args(kind)
        return _dict_decoder(_decoder(key_kind), _decoder(value_kind))
    if dataclasses.is_dataclass(kind):
        return _dataclass_decoder(kind)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return _enum_decoder(kind)
    scalar = _SCALARS.get(kind)
    if scalar is None:
        raise TypeError(f"cannot decode type {kind!r}")
    return scalar


def _union_decoder(options: tuple[Any, ...]) -> Decoder:
    nullable = type(None) in options
    decoders = [_decoder(option) for option in options if option is not type(None)]

    def decode_union(data: Any, where: str) -> Any:
        if data is None and nullable:
            return None
        errors = []
        for decode_option in decoders:
            try:
                return decode_option(data, where)
            except StateError as exc:
                errors.append(exc.reason)
        raise StateError(where, "; ".join(errors) or "does not match")

    return decode_union


def _sequence_decoder(item: Decoder, container: type) -> Decoder:
    def decode_sequence(data: Any, where: str) -> Any:
        items = _expect(list, data, where)
        return container(item(value, f"{where}[{index}]") for index, value in enumerate(items))

    return decode_sequence


def _fixed_tuple_decoder(items: tuple[Decoder, ...]) -> Decoder:
    def decode_fixed(data: Any, where: str) -> Any:
        values = _expect(list, data, where)
        if len(values) != len(items):
            raise StateError(where, f"expected {len(items)} items, found {len(values)}")
        return tuple(item(value, f"{where}[{index}]")
                     for index, (item, value) in enumerate(zip(items, values, strict=True)))

    return decode_fixed


def _dict_decoder(key: Decoder, value: Decoder) -> Decoder:
    def decode_dict(data: Any, where: str) -> Any:
        mapping = _expect(dict, data, where)
        return {key(name, where): value(item, f"{where}.{name}") for name, item in mapping.items()}

    return decode_dict


def _dataclass_decoder(kind: Any) -> Decoder:
    hints = typing.get_type_hints(kind)
    fields = [field for field in dataclasses.fields(kind) if field.init]
    decoders = {field.name: _decoder(hints[field.name]) for field in fields}
    required = {field.name for field in fields
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}

    def decode_dataclass(data: Any, where: str) -> Any:
        mapping = _expect(dict, data, where)
        unknown = mapping.keys() - decoders.keys()
        if unknown:
            raise StateError(where, f"unknown field(s) {', '.join(sorted(unknown))}")
        missing = required - mapping.keys()
        if missing:
            raise StateError(where, f"missing field {', '.join(sorted(missing))}")
        values = {name: decoders[name](value, f"{where}.{name}") for name, value in mapping.items()}
        try:
            return kind(**values)
        except (TypeError, ValueError) as exc:
            raise StateError(where, str(exc)) from None

    return decode_dataclass


def _enum_decoder(kind: type[Enum]) -> Decoder:
    def decode_enum(data: Any, where: str) -> Any:
        try:
            return kind(data)
        except (ValueError, TypeError):  # TypeError: unhashable JSON (a list or an object)
            raise StateError(where, f"{str(data)[:40]!r} is not a valid {kind.__name__}") from None

    return decode_enum


def _decode_int(data: Any, where: str) -> int:
    if isinstance(data, bool) or not isinstance(data, int):
        raise StateError(where, f"expected an integer, found {type(data).__name__}")
    return data


def _decode_float(data: Any, where: str) -> float:
    if isinstance(data, bool) or not isinstance(data, int | float):
        raise StateError(where, f"expected a number, found {type(data).__name__}")
    return float(data)


def _decode_bytes(data: Any, where: str) -> bytes:
    mapping = _expect(dict, data, where)
    if mapping.keys() != {"base64"} or not isinstance(mapping["base64"], str):
        raise StateError(where, 'expected {"base64": ...}')
    try:
        return base64.b64decode(mapping["base64"], validate=True)
    except (binascii.Error, ValueError):  # ValueError: text that is not ASCII
        raise StateError(where, "invalid base64") from None


def _decode_json_value(data: Any, where: str) -> Any:
    """A field whose value is decoded later, by whoever knows its type (a device kind's state)."""
    return data


def _decode_none(data: Any, where: str) -> None:
    if data is not None:
        raise StateError(where, "expected null")


_SCALARS: dict[Any, Decoder] = {
    int: _decode_int,
    float: _decode_float,
    bytes: _decode_bytes,
    str: lambda data, where: _expect(str, data, where),
    bool: lambda data, where: _expect(bool, data, where),
    Path: lambda data, where: Path(_expect(str, data, where)),
    type(None): _decode_none,
}


def _expect(kind: type[T], data: Any, where: str) -> T:
    if not isinstance(data, kind) or (kind is int and isinstance(data, bool)):
        raise StateError(where, f"expected {kind.__name__}, found {type(data).__name__}")
    return data
