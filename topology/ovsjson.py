"""A fast stand-in for python-ovs's JSON stream parser, for the OVSDB monitor's JSON-RPC.

python-ovs reads every JSON-RPC message with `ovs.json.Parser`, which lexes one character at a
time in Python unless its optional C extension (`ovs._json`, built against libopenvswitch) is
installed, and the pip package ships none. The monitor reply for a bridge of 2000 ports (about
1 MB) then takes most of a second to parse, on the path from a controller (re)start to its
first flow dump. `FastParser` keeps the parser's contract (`feed` returns how much of the input
belongs to the message, `is_done`, `finish` returns the value or an error string) but only
finds where the message ends (bracket depth outside strings, with regular expressions) and
then decodes it once with the standard library's C decoder. Whatever the two decoders could
read differently (\\u escapes, numbers outside python-ovs's range, malformed input) is handed
to python-ovs's own parser, so the values and error messages are python-ovs's.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import ovs.json

_PY_PARSER: Any = ovs.json.Parser  # python-ovs's own parser class, before install()

# Inside a string, up to its end quote (or a backslash that ends the input), written as an
# unrolled loop: each character can be matched one way only, so a string still open at the end
# of the input costs one linear backtrack. Not with possessive quantifiers: the `re` of CPython
# 3.11.2, Debian 12's python3, matches those wrongly here (the OVSDB monitor then never read a
# reply).
_STRING_BODY = r'[^"\\]*(?:\\.[^"\\]*)*'
# Outside strings, then complete strings each followed by more outside: stops at the quote of a
# string still open at the end of the input.
_COMPLETE = re.compile(rf'[^"]*(?:"{_STRING_BODY}"[^"]*)*', re.DOTALL)
_STRING = re.compile(rf'"{_STRING_BODY}"', re.DOTALL)
_STRING_REST = re.compile(_STRING_BODY, re.DOTALL)
_NOT_BRACKET = re.compile(r'[^\[\]{}]+')
_SPACE = re.compile(r'[ \t\n\r]*')  # python-ovs's whitespace

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
_NUMBER = re.compile(r"(-)?(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE]([-+]?[0-9]+))?$")


class _Unlike(ValueError):
    """A value python-ovs reads differently (or refuses): let python-ovs's parser decide."""


def _ovs_int(text: str) -> int | float:
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else _ovs_number(text)


def _ovs_number(text: str) -> int | float:
    """A JSON number as python-ovs reads it: an integral value within int64 is an int (whether
    written 100, 100.0 or 1e2), anything else a float, and -0.0 is 0."""
    m = _NUMBER.match(text)
    if m is None:
        raise _Unlike(text)
    sign, integer, fraction, exp = m.groups()
    if exp is not None and not -sys.maxsize - 1 <= int(exp) <= sys.maxsize:
        raise _Unlike(text)
    fraction = fraction if fraction is not None and fraction.strip("0") else None
    significand = int(integer + (fraction or ""))
    pow10 = (int(exp) if exp is not None else 0) - len(fraction or "")
    if significand == 0:
        return 0
    if significand <= 2 ** 63:
        while pow10 > 0 and significand <= 2 ** 63:
            significand, pow10 = significand * 10, pow10 - 1
        while pow10 < 0 and significand % 10 == 0:
            significand, pow10 = significand // 10, pow10 + 1
        if pow10 == 0 and (significand < 2 ** 63 or (sign and significand == 2 ** 63)):
            return -significand if sign else significand
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Unlike(text)
    return value if value != 0 else 0


def _refuse(text: str) -> Any:
    raise _Unlike(text)  # NaN, Infinity: not JSON to python-ovs


_DECODER = json.JSONDecoder(parse_int=_ovs_int, parse_float=_ovs_number, parse_constant=_refuse, strict=True)


def _py_parser(check_trailer: bool = False) -> Any:
    """A python-ovs parser. Not `_PY_PARSER()`: once installed, its __new__ (which names the
    module's `Parser`, then FastParser) refuses to build one."""
    parser = object.__new__(_PY_PARSER)
    parser.__init__(check_trailer=check_trailer)
    return parser


class FastParser(_PY_PARSER):  # type: ignore[misc]
    """`ovs.json.Parser` for one message of a stream (check_trailer=False, as python-ovs's
    JSON-RPC uses it); with check_trailer=True it is python-ovs's own parser.

    A subclass only so that python-ovs's parser, which looks its states up on the module's
    `Parser` (`Parser.__lex_start`), still finds them once this class is installed there."""

    def __new__(cls, check_trailer: bool = False) -> Any:
        if check_trailer:
            return _py_parser(check_trailer=True)  # whole documents (schema files): rare, keep exact
        return object.__new__(cls)

    def __init__(self, check_trailer: bool = False) -> None:
        self._parts: list[str] = []  # everything fed and consumed so far
        self._size = 0  # their total length
        self._start: int | None = None  # where the message's first bracket is
        self._depth = 0  # brackets open, outside strings
        self._in_string = False  # the input so far ends inside a string...
        self._escaped = False  # ...right after a backslash
        self._value: Any = None
        self._fallback: Any = None  # python-ovs's parser, once it decides
        self.done = False

    def is_done(self) -> bool:
        return self._fallback.is_done() if self._fallback is not None else self.done

    def feed(self, s: str) -> int:
        """How many characters of `s` belong to the message (all of them until it is complete)."""
        if self._fallback is not None:
            return self._fallback.feed(s)
        if self.done or not s:
            return 0
        pos = 0
        if self._start is None:
            pos = _SPACE.match(s).end()
            if pos == len(s):
                return self._keep(s)
            if s[pos] not in "{[":
                return self._defer(s)  # not an object or array: python-ovs says what is wrong
            self._start = self._size + pos
        elif self._in_string:
            pos = self._close_string(s)
            if self._in_string:
                return self._keep(s)
        end = _COMPLETE.match(s, pos).end()
        if self._closes(s[pos:end]):
            return self._decode(s)
        if end < len(s):  # a string opens at `end` and goes on in the next chunk
            self._in_string = True
            self._close_string(s, end + 1)
        return self._keep(s)

    def finish(self) -> Any:
        """The value, or python-ovs's error message for input it refuses."""
        if self._fallback is None and not self.done:
            self._defer("")  # incomplete: python-ovs says how
        if self._fallback is not None:
            return self._fallback.finish()
        value, self._value = self._value, None
        return value

    # ---- helpers

    def _keep(self, s: str) -> int:
        self._parts.append(s)
        self._size += len(s)
        return len(s)

    def _close_string(self, s: str, pos: int = 0) -> int:
        """Scan `s` from `pos` inside a string; return where the string ended (past its quote)."""
        if self._escaped:
            self._escaped, pos = False, pos + 1
        pos = _STRING_REST.match(s, pos).end()
        if pos >= len(s):
            return pos
        if s[pos] == "\\":  # the last character: what it escapes comes in the next chunk
            self._escaped = True
            return len(s)
        self._in_string = False
        return pos + 1

    def _closes(self, segment: str) -> bool:
        """Track the depth over `segment` (no open string in it); True if the message ends in it."""
        brackets = _NOT_BRACKET.sub("", _STRING.sub("", segment))
        closing = brackets.count("}") + brackets.count("]")
        if closing < self._depth:
            self._depth += len(brackets) - 2 * closing
            return False
        for c in brackets:
            self._depth += 1 if c in "{[" else -1
            if self._depth == 0:
                return True
        return False

    def _decode(self, s: str) -> int:
        """The message ends in `s`: decode it all at once, or let python-ovs decide."""
        text = "".join(self._parts) + s
        assert self._start is not None
        if "\\u" not in text:  # python-ovs refuses some \u escapes json accepts (\u0000, lone surrogates)
            try:
                value, end = _DECODER.raw_decode(text, self._start)
            except (ValueError, RecursionError):
                pass
            else:
                self._parts, self._value, self.done = [], value, True
                return end - self._size
        return self._defer(s)

    def _defer(self, s: str) -> int:
        """Hand the whole input so far to python-ovs's parser; what of `s` it took."""
        self._fallback = _py_parser()
        fed = self._fallback.feed("".join(self._parts) + s) if (self._parts or s) else 0
        self._parts = []
        return max(fed - self._size, 0)


def from_string(text: str) -> Any:
    """`ovs.json.from_string` (one whole document: the value, or python-ovs's error message),
    through FastParser when the document is one value and nothing but whitespace after it."""
    parser = FastParser()
    used = parser.feed(text)
    if parser.is_done() and not text[used:].strip(" \t\n\r"):
        return parser.finish()
    return ovs.json.from_string(text)  # python-ovs says what is wrong (or what else it reads)


def from_file(path: str) -> Any:
    """`ovs.json.from_file`, faster: the OVSDB schema file every monitor reads at start."""
    with open(path) as stream:
        return from_string(stream.read())


def install() -> None:
    """Make python-ovs's JSON-RPC use FastParser, unless it has its C parser (faster still)."""
    if ovs.json.PARSER == ovs.json.PARSER_PY and ovs.json.Parser is _PY_PARSER:
        ovs.json.Parser = FastParser
