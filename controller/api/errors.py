"""One error format for every 4xx: `{"detail": ..., "message": "<field>: <what is wrong>"}`.

422s carry `detail` as a list of `{"loc", "msg", "type"}` (FastAPI's shape, messages cleaned up)
and, for a rejected policy, `problems` as `{"location", "message"}`; other errors carry
`detail` as a string that names the field or object at fault.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.api import schemas as s
from controller.policy.validate import Problem
from controller.store import Conflict, NotFound, Rejected, StoreError

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_PREFIXES = ("Value error, ", "Assertion failed, ")


class Unprocessable(Exception):
    """A request that parsed but makes no sense; `loc` names the field."""

    def __init__(self, loc: Sequence[str | int], msg: str) -> None:
        super().__init__(msg)
        self.loc = list(loc)
        self.msg = msg


def dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _clean(msg: str) -> str:
    for prefix in _PREFIXES:
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def _item(err: dict[str, Any]) -> s.ErrorItem:
    loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ()) if p != "[key]"]
    kind = str(err.get("type", "value_error"))
    msg = _clean(str(err.get("msg", "")))
    if kind == "extra_forbidden" and loc:
        msg = f"unknown field {loc[-1]!r}"
    elif kind == "missing" and loc:
        msg = f"missing required field {loc[-1]!r}"
    return s.ErrorItem(loc=loc, msg=msg, type=kind)


def unprocessable(items: list[s.ErrorItem], problems: list[s.ProblemOut] | None = None,
                  message: str | None = None) -> JSONResponse:
    text = message or "; ".join(f"{dotted(i.loc)}: {i.msg}" if i.loc else i.msg for i in items)
    body = s.ValidationErrorOut(detail=items, message=text, problems=problems or [])
    return JSONResponse(body.model_dump(), status_code=422)


def split_location(location: str) -> list[str | int]:
    """"rules[6].services[0]" -> ["rules", 6, "services", 0]"""
    return [name if name else int(number) for name, number in _PART.findall(location)]


def rejected(problems: Sequence[Problem], headline: str) -> JSONResponse:
    items = [s.ErrorItem(loc=["body", *split_location(p.location)], msg=p.message, type="policy_problem")
             for p in problems]
    listed = "; ".join(str(p) for p in problems)
    return unprocessable(items, [s.ProblemOut(location=p.location, message=p.message) for p in problems],
                         f"{headline}: {listed}")


def _simple(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return unprocessable([_item(e) for e in exc.errors()])


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _simple(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _unprocessable(request: Request, exc: Unprocessable) -> JSONResponse:
    return unprocessable([s.ErrorItem(loc=exc.loc, msg=exc.msg, type="value_error")])


async def _store(request: Request, exc: StoreError) -> JSONResponse:
    if isinstance(exc, Rejected):
        return rejected(exc.problems, str(exc).splitlines()[0])
    if isinstance(exc, NotFound):
        return _simple(404, str(exc))
    if isinstance(exc, Conflict):
        return _simple(409, str(exc))
    return _simple(400, str(exc))


async def _value(request: Request, exc: ValueError) -> JSONResponse:
    # The store refuses nonsense with ValueError after the schemas let it through.
    return unprocessable([s.ErrorItem(loc=["body"], msg=str(exc), type="value_error")])


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(Unprocessable, _unprocessable)  # type: ignore[arg-type]
    app.add_exception_handler(StoreError, _store)  # type: ignore[arg-type]
    app.add_exception_handler(ValueError, _value)  # type: ignore[arg-type]


# Documented on every route, so clients (and schemathesis) know the error shapes.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": s.ErrorOut, "description": "missing, invalid or revoked bearer token"},
    403: {"model": s.ErrorOut, "description": "the token's role may not do this"},
    404: {"model": s.ErrorOut, "description": "no such object"},
    409: {"model": s.ErrorOut, "description": "clashes with stored state; names the field"},
    413: {"model": s.ErrorOut, "description": "request body too large"},
    422: {"model": s.ValidationErrorOut, "description": "invalid request; every fault named"},
}
