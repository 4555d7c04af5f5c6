"""Refuse request bodies over a size limit before anything buffers them (HTTP 413).

FastAPI reads a whole body into memory and parses it before a handler runs, so without a bound one
client decides how much memory the server holds and how much text it tokenises. This is a pure ASGI
middleware, outside every route, so the bound holds for every endpoint alike:

- a declared `Content-Length` over the limit is refused without passing a byte of the body on;
- a body without one (chunked transfer) is counted as it arrives, and the request is cut off on the
  chunk that crosses the limit: the app never receives more than the limit, and nothing here buffers.

On a cut-off the middleware answers 413 itself and tells the app the client disconnected; whatever the
app sends afterwards is dropped. Before answering, the rest of the body is read and thrown away, up to
`DRAIN_BYTES` and `DRAIN_S` (nginx's lingering close does the same): a client still uploading when the
server closes gets a connection reset instead of the 413 (seen with 8 MiB bodies under `bench serving
--hostile`). Nothing drained is kept, so memory stays bounded; bodies beyond the drain bounds are cut off
at once. The response carries `Connection: close`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SETTING = "max_request_bytes"  # named in the error so an operator knows what to raise
DRAIN_BYTES = 64 * 2**20  # an oversized body up to this size is read and discarded before the 413
DRAIN_S = 10.0  # ... for at most this long (a slow upload is not waited for)


class BodyLimit:
    """ASGI middleware: bodies larger than `max_bytes()` bytes get an OpenAI-shaped 413.

    `max_bytes` is a callable because the limit comes from the service settings, which exist only once
    the service has started, after the app (and this middleware) was built.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            if declared <= DRAIN_BYTES:
                await _drain(receive)
            await _refuse(send, limit)
            return
        received = 0
        refused = False  # this middleware sent the 413
        started = False  # the app started its own response

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:
                        refused = True
                        if message.get("more_body", False):
                            await _drain(receive)
                        await _refuse(send, limit)
                    # Either way the app must stop reading: to it, the client is gone.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the 413 is the answer; the app's reply to the "disconnect" goes nowhere
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # The app failed on the body it was denied; the client already has its 413.


async def _drain(receive: Receive) -> None:
    """Read and discard the rest of the body, within `DRAIN_BYTES` and `DRAIN_S`."""
    async def discard() -> None:
        drained = 0
        while drained <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            drained += len(message.get("body", b""))

    try:
        await asyncio.wait_for(discard(), DRAIN_S)
    except TimeoutError:
        pass  # answered now; the connection closes under the rest of the upload


def _content_length(scope: Scope) -> int | None:
    """The declared body size, or None when absent or unreadable (then the bytes are counted)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def error_payload(limit: int) -> dict[str, Any]:
    """The OpenAI-shaped body of the 413 (public for tests and for documentation)."""
    return {
        "error": {
            "message": f"the request body is larger than this server's limit of {limit} bytes "
            f"(setting {SETTING})",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(error_payload(limit)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
