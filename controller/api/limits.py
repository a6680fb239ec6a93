"""Request body size limit: 413 when Content-Length, or the body as it streams in, is too big."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(HTTPException):
    """Raised from `receive`: FastAPI lets an HTTPException through its body parsing (any other
    error would become a 400), and the app's handler turns it into the 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large: the streamed body exceeds the limit of {limit} bytes")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1 or (declared is not None and declared > self.max_bytes):
            await self._refuse(send, declared)
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _TooLarge:
            if started:
                raise
            await self._refuse(send, None)

    async def _refuse(self, send: Send, declared: int | None) -> None:
        if declared == -1:
            status, detail = 400, "Content-Length header: not a number"
        else:
            size = f"{declared} bytes" if declared is not None else "the streamed body"
            status, detail = 413, f"request body too large: {size} exceeds the limit of {self.max_bytes} bytes"
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    """The declared length; None if absent; -1 if it is not a number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None
