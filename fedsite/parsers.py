"""One JSON parser for the whole API, and the string checks every service reuses.

Invariants: a value that comes out of :func:`json_parse` (and so out of any DRF request body or the
``X-Update-Meta`` header) is nested at most ``FEDSITE_MAX_JSON_DEPTH`` levels deep, holds no ``NaN`` or
``Infinity``, and none of its keys or strings contains a NUL character or a lone UTF-16 surrogate (which
Postgres cannot store and UTF-8 cannot encode). A refusal is a 400 whose message and ``details`` name
the path of the offending field (``capabilities.gpus[2].name``); an oversized body is a 413. Nothing is
parsed further than the first problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import IO, Any

from django.conf import settings
from rest_framework.parsers import BaseParser

from fedsite.errors import PayloadTooLarge, ValidationFailed


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; send a finite number or null")


def _describe_bad_string(text: str) -> str | None:
    """What is wrong with ``text`` (a NUL or a lone surrogate), or None when it can be stored."""
    if "\x00" in text:
        return "contains a NUL character (U+0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (U+{ord(text[exc.start]):04X}), which is not valid Unicode"
    return None


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _walk(value: Any, path: str, max_depth: int) -> Iterator[tuple[str, str]]:
    """Yield ``(path, problem)`` for each bad key or string, depth first; iterative, so no recursion."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            problem = _describe_bad_string(item)
            if problem is not None:
                yield where or "body", problem
        elif isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                yield where or "body", f"is nested more than {max_depth} levels deep"
                continue
            if isinstance(item, dict):
                children: list[tuple[Any, str]] = []
                for key, child in item.items():
                    if isinstance(key, str):
                        problem = _describe_bad_string(key)
                        if problem is not None:
                            shown = key.encode("utf-8", "backslashreplace").decode("ascii", "replace")
                            yield _join(where, repr(shown)), f"has a key that {problem}"
                            continue
                    children.append((child, _join(where, str(key))))
            else:
                children = [(child, _join(where, index)) for index, child in enumerate(item)]
            stack.extend((child, child_path, depth + 1) for child, child_path in reversed(children))


def json_check(value: Any, *, field: str = "", max_depth: int | None = None) -> Any:
    """Refuse ``value`` if it nests too deeply or holds a key or string a database cannot store.

    Parameters
    ----------
    value : Any
        Decoded JSON (or any structure of dicts, lists and scalars) about to be stored.
    field : str
        The name of the field ``value`` came from; it prefixes the path in the error.
    max_depth : int, optional
        Deepest nesting allowed; ``FEDSITE_MAX_JSON_DEPTH`` by default.

    Returns
    -------
    Any
        ``value`` itself, unchanged.

    Raises
    ------
    ValidationFailed
        Naming the path of the first offending field.
    """
    limit = settings.FEDSITE_MAX_JSON_DEPTH if max_depth is None else max_depth
    for path, problem in _walk(value, field, limit):
        raise ValidationFailed(
            f"{path} {problem}; remove it and send the request again.",
            code="invalid_string" if "nested" not in problem else "too_deep",
            details={path: problem},
        )
    return value


def text_check(value: str, *, field: str) -> str:
    """Refuse a string with a NUL character or a lone surrogate, naming ``field``."""
    problem = _describe_bad_string(value)
    if problem is not None:
        raise ValidationFailed(
            f"{field} {problem}; remove it and send the request again.",
            code="invalid_string",
            details={field: problem},
        )
    return value


# A JSON string literal (escapes included), or one structural character.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},:]')


def _check_text_depth(text: str, field: str, max_depth: int) -> None:
    """Refuse JSON text nested deeper than ``max_depth`` before the (recursive) decoder sees it.

    A scan of string literals and brackets that keeps, per open container, the current key or index,
    so the refusal names the path where the nesting went too deep.
    """
    stack: list[list[Any]] = []  # per open container: [kind, key or index, last string literal]
    for match in _TOKEN.finditer(text):
        token = match.group()
        first = token[0]
        if first == '"':
            if stack and stack[-1][0] == "{":
                stack[-1][2] = token
        elif first == ":":
            if stack and stack[-1][0] == "{" and stack[-1][2] is not None:
                try:
                    stack[-1][1] = json.loads(stack[-1][2])
                except ValueError:
                    stack[-1][1] = stack[-1][2]
        elif first == ",":
            if stack and stack[-1][0] == "[":
                stack[-1][1] += 1
        elif first in "[{":
            if len(stack) >= max_depth:
                path = field
                for kind, key, _ in stack:
                    path = _join(path, key if kind == "[" else str(key))
                raise ValidationFailed(
                    f"{path or 'body'} is nested more than {max_depth} levels deep; flatten it.",
                    code="too_deep",
                    details={path or "body": f"is nested more than {max_depth} levels deep"},
                )
            stack.append([first, 0 if first == "[" else "", None])
        elif stack:
            stack.pop()


def json_parse(raw: bytes | str, *, field: str = "", max_depth: int | None = None) -> Any:
    """Decode untrusted JSON text and check it with :func:`json_check`.

    Raises ``ValidationFailed`` for text that is not UTF-8 JSON, uses ``NaN``/``Infinity``, nests more
    than ``max_depth`` levels deep, or holds a NUL or lone surrogate in a key or string.
    """
    label = field or "body"
    limit = settings.FEDSITE_MAX_JSON_DEPTH if max_depth is None else max_depth
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        _check_text_depth(text, field, limit)
        value = json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ValidationFailed(
            f"{label} is not UTF-8 ({exc.reason} at byte {exc.start}); send UTF-8 JSON.",
            details={label: "Not UTF-8."},
        ) from None
    except RecursionError:
        raise ValidationFailed(
            f"{label} is nested more than {limit} levels deep; flatten it.",
            code="too_deep",
            details={label: f"is nested more than {limit} levels deep"},
        ) from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, so is a refused constant
        raise ValidationFailed(
            f"{label} is not valid JSON: {exc}.", details={label: "Invalid JSON."}
        ) from None
    return json_check(value, field=field, max_depth=limit)


def read_limited(stream: IO[bytes], *, limit: int, what: str) -> bytes:
    """Read at most ``limit`` bytes from ``stream``; a longer body is a 413 naming the limit."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(
            f"{what} is larger than {limit} bytes, the most this endpoint accepts.",
            details={"max_bytes": limit},
        )
    return data


class StrictJSONParser(BaseParser):
    """DRF parser for ``application/json``: :func:`json_parse` on a body of at most
    ``FEDSITE_MAX_JSON_BODY_BYTES`` (every JSON endpoint is small; uploads have their own view)."""

    media_type = "application/json"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        if stream is None:
            return {}
        limit = settings.FEDSITE_MAX_JSON_BODY_BYTES
        return json_parse(read_limited(stream, limit=limit, what="The JSON body"))
