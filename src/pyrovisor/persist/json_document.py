"""JSON text to and from Python values with limits, so hostile input becomes a StateError, never a crash."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pyrovisor.errors import StateError

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a UTF-16 pair
MAX_INTEGER_DIGITS = 24  # a u64 has 20 digits; anything longer is not a value pyrovisor ever writes


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _Refused(f"an integer of {len(text)} digits is longer than any valid field")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text} does not fit a floating-point number")
    return value


def _parse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def parse_json(data: bytes | bytearray | memoryview | str, source: str) -> Any:
    """The value encoded in `data`. Invalid UTF-8 or JSON, nesting deeper than the interpreter allows,
    over-long integers, NaN/Infinity and strings holding half a UTF-16 pair are refused with a StateError
    naming `source`."""
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        document = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
        if _SURROGATE_ESCAPE.search(text):  # rare: only then is the document re-encoded to look for them
            json.dumps(document, ensure_ascii=False).encode("utf-8")
        return document
    except UnicodeEncodeError:
        raise StateError(source, "a string holds an unpaired UTF-16 surrogate (not valid text)") from None
    except UnicodeDecodeError:
        raise StateError(source, "not valid UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise StateError(source, f"not valid JSON: {exc}") from None
    except RecursionError:
        raise StateError(source, "JSON nested too deeply") from None
    except _Refused as exc:
        raise StateError(source, exc.reason) from None


def parse_json_object(data: bytes | bytearray | memoryview | str, source: str) -> dict[str, Any]:
    """Like parse_json, but the document must be a JSON object."""
    document = parse_json(data, source)
    if not isinstance(document, dict):
        raise StateError(source, f"expected a JSON object, found {type(document).__name__}")
    return document


def dump_json(document: Any) -> bytes:
    """Compact UTF-8 JSON (the form every pyrovisor file and message uses)."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
