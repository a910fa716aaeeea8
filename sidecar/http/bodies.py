"""Reading request bodies: bounded in size, decoded straight into Structs."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

from sidecar.core.digits import digits
from sidecar.core.errors import InvalidInput
from sidecar.http.errors import ApiError

T = TypeVar("T")
_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) before reading more than ``limit`` bytes."""
    # The rest of the body stays unread: the connection cannot carry another request.
    too_large = ApiError(
        413, "body_too_large", f"request body exceeds {limit} bytes", headers={"Connection": "close"}
    )
    declared = request.headers.get("content-length")
    if declared is not None and digits(declared) and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def invalid_from(exc: msgspec.MsgspecError) -> InvalidInput:
    """A msgspec error as InvalidInput, naming the offending field when msgspec does."""
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        match = _PATH.search(text)
        field = match.group(1) if match else None
        return InvalidInput(text, code="invalid_field", field=field or None)
    return InvalidInput(f"malformed JSON: {exc}", code="malformed_json")


def decode(data: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    if not data:
        raise InvalidInput("a JSON body is required", code="malformed_json")
    try:
        value = decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise invalid_from(exc) from None
    if b"\\u0000" in data and _holds_nul(msgspec.json.decode(data)):
        # Postgres stores no NUL in text or jsonb: refused here, not at the write (a 500)
        # or, worse, at the drain of a usage record.
        raise InvalidInput("strings may not hold the NUL character (\\u0000)", code="invalid_field")
    return value


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def decode_into(data: bytes, kind: type[T], **fixed: Any) -> T:
    """Decode a JSON object and convert it to ``kind``, with ``fixed`` fields set from the
    path (a body may repeat them only with the same value)."""
    raw = decode(data, msgspec.json.Decoder(dict[str, Any]))
    for name, value in fixed.items():
        if name in raw and raw[name] != value:
            raise InvalidInput(f"{name} in the body does not match the path", field=name)
        raw[name] = value
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise invalid_from(exc) from None
