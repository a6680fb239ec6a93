"""The selector language: Calico-style expressions over a VM's facts.

    tag.tier == 'web' && usergroup in {'finance', 'audit'} && !has(posture.edr)

Parsing yields a small immutable AST; matching, explaining and the trust rule of DESIGN §5
(`platform_constrained`) are pure functions over it. See docs/selectors.md for the user guide.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase

from controller.model import PLATFORM_ATTRS, VM, Attr, Fact

__all__ = [
    "All",
    "And",
    "Compare",
    "Evidence",
    "Expr",
    "Has",
    "In",
    "Not",
    "Op",
    "Or",
    "SelectorError",
    "Term",
    "attrs_used",
    "explain_match",
    "format_selector",
    "matches",
    "parse_selector",
    "platform_constrained",
]


class SelectorError(ValueError):
    """A selector that does not parse. `column` is 1-based, pointing at the offending text."""

    def __init__(self, reason: str, column: int) -> None:
        super().__init__(f"column {column}: {reason}")
        self.reason = reason
        self.column = column


# ---------------------------------------------------------------------------------------------
# AST

KEYED_ATTRS: frozenset[Attr] = frozenset({Attr.TAG, Attr.POSTURE})
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class Term:
    """An attribute, with its key for tag.KEY and posture.KEY ("" otherwise)."""

    attr: Attr
    key: str = ""

    def __post_init__(self) -> None:
        # Built by hand (tests, policy code) as well as by the parser: keep the same invariants.
        if (self.attr in KEYED_ATTRS) != bool(self.key):
            raise ValueError(
                f"{self.attr} {'needs' if self.attr in KEYED_ATTRS else 'takes no'} key"
            )
        if self.key and not _KEY_RE.fullmatch(self.key):
            raise ValueError(f"bad key {self.key!r} (letters, digits, '_', '.', '-')")

    def __str__(self) -> str:
        return f"{self.attr}.{self.key}" if self.key else str(self.attr)


class Op(str, Enum):
    EQ = "=="
    NE = "!="
    GLOB = "glob"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Compare:
    term: Term
    op: Op
    value: str


@dataclass(frozen=True)
class In:
    """`term in {...}`, or `term not in {...}` when negated. Sets are unordered, hence frozenset."""

    term: Term
    values: frozenset[str]
    negated: bool = False


@dataclass(frozen=True)
class Has:
    term: Term


@dataclass(frozen=True)
class All:
    """`all()`: every VM."""


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class And:
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Or:
    left: Expr
    right: Expr


Leaf = Compare | In | Has | All
Expr = Compare | In | Has | All | Not | And | Or


# ---------------------------------------------------------------------------------------------
# Lexer

_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_SYMBOLS = ("&&", "||", "==", "!=", "!", "(", ")", "{", "}", ",")


@dataclass(frozen=True)
class _Token:
    kind: str  # "word" | "string" | "sym" | "end"
    text: str  # the word, the unescaped string, or the symbol
    column: int  # 1-based


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "'\"":
            value, i_next = _read_string(text, i)
            tokens.append(_Token("string", value, i + 1))
            i = i_next
        elif (m := _WORD_RE.match(text, i)) is not None:
            tokens.append(_Token("word", m.group(), i + 1))
            i = m.end()
        else:
            sym = next((s for s in _SYMBOLS if text.startswith(s, i)), None)
            if sym is None:
                raise SelectorError(f"unexpected character {ch!r}", i + 1)
            tokens.append(_Token("sym", sym, i + 1))
            i += len(sym)
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


def _read_string(text: str, start: int) -> tuple[str, int]:
    """Read a quoted literal at `start`; a backslash makes the next character literal."""
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif ch == quote:
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise SelectorError(f"unterminated string (missing closing {quote})", start + 1)


# ---------------------------------------------------------------------------------------------
# Parser (recursive descent; precedence ! > && > ||)


def parse_selector(text: str) -> Expr:
    """Parse selector text. Raises SelectorError naming the problem and its column."""
    if not text.strip():
        raise SelectorError("empty selector (use all() to select every VM)", 1)
    return _Parser(_tokenize(text)).parse()


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._pos = 0

    def parse(self) -> Expr:
        expr = self._or()
        tok = self._peek()
        if tok.kind != "end":
            raise SelectorError(
                f"unexpected {_describe(tok)} after a complete expression", tok.column
            )
        return expr

    def _peek(self) -> _Token:
        return self._tokens[self._pos]

    def _next(self) -> _Token:
        tok = self._tokens[self._pos]
        self._pos += 1
        return tok

    def _accept(self, kind: str, text: str) -> bool:
        tok = self._peek()
        if tok.kind == kind and tok.text == text:
            self._pos += 1
            return True
        return False

    def _expect_sym(self, sym: str, context: str) -> None:
        tok = self._peek()
        if not self._accept("sym", sym):
            raise SelectorError(f"expected '{sym}' {context}, got {_describe(tok)}", tok.column)

    def _or(self) -> Expr:
        expr = self._and()
        while self._accept("sym", "||"):
            expr = Or(expr, self._and())
        return expr

    def _and(self) -> Expr:
        expr = self._unary()
        while self._accept("sym", "&&"):
            expr = And(expr, self._unary())
        return expr

    def _unary(self) -> Expr:
        if self._accept("sym", "!"):
            return Not(self._unary())
        return self._primary()

    def _primary(self) -> Expr:
        tok = self._peek()
        if self._accept("sym", "("):
            expr = self._or()
            self._expect_sym(")", f"to close the '(' at column {tok.column}")
            return expr
        if tok.kind != "word":
            raise SelectorError(
                f"expected an attribute, has(...) or all(), got {_describe(tok)}", tok.column
            )
        if tok.text == "all" and self._tokens[self._pos + 1].text == "(":
            self._pos += 1
            self._expect_sym("(", "after 'all'")
            self._expect_sym(")", "after 'all(' (all() takes no arguments)")
            return All()
        if tok.text == "has":
            self._pos += 1
            self._expect_sym("(", "after 'has'")
            term = self._term()
            self._expect_sym(")", "to close has(...)")
            return Has(term)
        return self._comparison(self._term())

    def _term(self) -> Term:
        tok = self._next()
        if tok.kind != "word":
            raise SelectorError(f"expected an attribute, got {_describe(tok)}", tok.column)
        return _make_term(tok.text, tok.column)

    def _comparison(self, term: Term) -> Expr:
        tok = self._next()
        if tok.kind == "sym" and tok.text in ("==", "!="):
            return Compare(term, Op(tok.text), self._string(f"after '{tok.text}'"))
        if tok.kind == "word" and tok.text == "glob":
            return Compare(term, Op.GLOB, self._string("after 'glob'"))
        if tok.kind == "word" and tok.text == "in":
            return In(term, self._set(), negated=False)
        if tok.kind == "word" and tok.text == "not":
            if not self._accept("word", "in"):
                raise SelectorError(
                    f"expected 'in' after 'not', got {_describe(self._peek())}", self._peek().column
                )
            return In(term, self._set(), negated=True)
        raise SelectorError(
            f"expected ==, !=, in, not in or glob after '{term}', got {_describe(tok)}", tok.column
        )

    def _string(self, context: str) -> str:
        tok = self._next()
        if tok.kind != "string":
            raise SelectorError(f"expected a quoted string {context}", tok.column)
        return tok.text

    def _set(self) -> frozenset[str]:
        self._expect_sym("{", "to open a set, e.g. {'a', 'b'}")
        if self._peek().text == "}" and self._peek().kind == "sym":
            raise SelectorError("empty set (list at least one quoted string)", self._peek().column)
        values = [self._string("in set")]
        while self._accept("sym", ","):
            values.append(self._string("after ',' in set"))
        self._expect_sym("}", "to close the set")
        return frozenset(values)


def _describe(tok: _Token) -> str:
    if tok.kind == "end":
        return "end of selector"
    if tok.kind == "string":
        return f"string {tok.text!r}"
    return f"'{tok.text}'"


_ATTR_BY_NAME: dict[str, Attr] = {a.value: a for a in Attr}


def _make_term(word: str, column: int) -> Term:
    base, dot, key = word.partition(".")
    attr = _ATTR_BY_NAME.get(base)
    if attr is None:
        raise SelectorError(f"unknown attribute '{word}'{_hint(base)}", column)
    if attr in KEYED_ATTRS:
        if not dot or not key:
            raise SelectorError(f"'{attr}' needs a key: {attr}.KEY", column)
        if not _KEY_RE.fullmatch(key):
            raise SelectorError(
                f"bad key '{key}' in '{word}' (letters, digits, '_', '.', '-')", column
            )
        return Term(attr, key)
    if dot:
        example = " (use app == 'NAME')" if attr is Attr.APP else ""
        raise SelectorError(f"'{attr}' takes no key, got '{word}'{example}", column)
    return Term(attr)


def _hint(base: str) -> str:
    close = difflib.get_close_matches(base, list(_ATTR_BY_NAME), n=1, cutoff=0.6)
    if close:
        attr = _ATTR_BY_NAME[close[0]]
        return f" (use {attr}.KEY)" if attr in KEYED_ATTRS else f" (did you mean '{attr}'?)"
    names = ", ".join(f"{a}.KEY" if a in KEYED_ATTRS else str(a) for a in Attr)
    return f" (known attributes: {names})"


# ---------------------------------------------------------------------------------------------
# Formatting


def format_selector(expr: Expr) -> str:
    """Canonical text: single quotes, sorted sets, minimal parentheses (plus around negated
    comparisons, for readability). parse_selector(format_selector(e)) == e."""
    if isinstance(expr, All):
        return "all()"
    if isinstance(expr, Has):
        return f"has({expr.term})"
    if isinstance(expr, Compare):
        return f"{expr.term} {expr.op} {_quote(expr.value)}"
    if isinstance(expr, In):
        values = ", ".join(_quote(v) for v in sorted(expr.values))
        return f"{expr.term} {'not in' if expr.negated else 'in'} {{{values}}}"
    if isinstance(expr, Not):
        inner = format_selector(expr.operand)
        bare = isinstance(expr.operand, (Has, All, Not))
        return f"!{inner}" if bare else f"!({inner})"
    if isinstance(expr, And):
        # Parsing is left-associative, so a right-hand And needs parentheses to survive.
        return f"{_wrap(expr.left, (Or,))} && {_wrap(expr.right, (Or, And))}"
    if isinstance(expr, Or):
        return f"{format_selector(expr.left)} || {_wrap(expr.right, (Or,))}"
    raise TypeError(f"not a selector expression: {expr!r}")


def _wrap(expr: Expr, needs_parens: tuple[type, ...]) -> str:
    text = format_selector(expr)
    return f"({text})" if isinstance(expr, needs_parens) else text


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------------------------------------
# Matching


def _candidates(term: Term, vm: VM) -> tuple[tuple[Fact, str], ...]:
    """The facts a term looks at, each with the string it compares."""
    if term.attr is Attr.APP:
        # Unkeyed `app` is the set of running app names, which APP facts hold in their key.
        return tuple((f, f.key) for f in vm.facts_of(Attr.APP))
    return tuple((f, f.value) for f in vm.values(term.attr, term.key))


def _leaf_hits(leaf: Leaf, vm: VM) -> tuple[bool, tuple[Fact, ...]]:
    """Whether the leaf holds, and the facts that decided it."""
    if isinstance(leaf, All):
        return True, ()
    candidates = _candidates(leaf.term, vm)
    present = tuple(f for f, _ in candidates)
    if isinstance(leaf, Has):
        return bool(present), present
    hit = tuple(f for f, v in candidates if _value_matches(leaf, v))
    negated = leaf.negated if isinstance(leaf, In) else leaf.op is Op.NE
    if hit:
        # Some fact matched: it alone decides, for the positive form and its negation alike.
        return not negated, hit
    # Nothing matched: every fact present was checked and failed.
    return negated, present


def _value_matches(leaf: Compare | In, value: str) -> bool:
    """The positive form of the comparison (`!=` and `not in` are negated by the caller)."""
    if isinstance(leaf, In):
        return value in leaf.values
    if leaf.op is Op.GLOB:
        return fnmatchcase(value, leaf.value)
    return value == leaf.value


def matches(expr: Expr, vm: VM) -> bool:
    """Whether `vm` is selected by `expr`. Short-circuits; use explain_match for evidence."""
    if isinstance(expr, Not):
        return not matches(expr.operand, vm)
    if isinstance(expr, And):
        return matches(expr.left, vm) and matches(expr.right, vm)
    if isinstance(expr, Or):
        return matches(expr.left, vm) or matches(expr.right, vm)
    return _leaf_hits(expr, vm)[0]


@dataclass(frozen=True)
class Evidence:
    """How one leaf evaluated. `satisfied` is the leaf's own truth, before any enclosing `!`."""

    term: str  # canonical text of the leaf, e.g. "tag.dept == 'finance'"
    satisfied: bool
    facts: tuple[Fact, ...]  # the facts that decided it; empty if none were present


def explain_match(expr: Expr, vm: VM) -> tuple[bool, tuple[Evidence, ...]]:
    """Evaluate every leaf (no short-circuit, so the explanation is complete), left to right."""
    if isinstance(expr, Not):
        result, evidence = explain_match(expr.operand, vm)
        return not result, evidence
    if isinstance(expr, (And, Or)):
        left, left_ev = explain_match(expr.left, vm)
        right, right_ev = explain_match(expr.right, vm)
        result = (left and right) if isinstance(expr, And) else (left or right)
        return result, left_ev + right_ev
    satisfied, facts = _leaf_hits(expr, vm)
    return satisfied, (Evidence(format_selector(expr), satisfied, facts),)


# ---------------------------------------------------------------------------------------------
# Static analysis


def attrs_used(expr: Expr) -> frozenset[Attr]:
    if isinstance(expr, Not):
        return attrs_used(expr.operand)
    if isinstance(expr, (And, Or)):
        return attrs_used(expr.left) | attrs_used(expr.right)
    if isinstance(expr, All):
        return frozenset()
    return frozenset({expr.term.attr})


def platform_constrained(expr: Expr) -> bool:
    """The trust rule of DESIGN §5: does every VM this selects satisfy some positive test of a
    platform attribute? Negations match almost everything, so they never constrain."""
    if isinstance(expr, And):
        return platform_constrained(expr.left) or platform_constrained(expr.right)
    if isinstance(expr, Or):
        return platform_constrained(expr.left) and platform_constrained(expr.right)
    if isinstance(expr, (Not, All)):
        return False
    if isinstance(expr, Compare) and expr.op is Op.NE:
        return False
    if isinstance(expr, In) and expr.negated:
        return False
    return expr.term.attr in PLATFORM_ATTRS
