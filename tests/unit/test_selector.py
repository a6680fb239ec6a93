"""The selector language: parsing, errors, formatting, matching, evidence, the trust rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.identity.selector import (
    All,
    And,
    Compare,
    Evidence,
    Expr,
    Has,
    In,
    Not,
    Op,
    Or,
    SelectorError,
    Term,
    attrs_used,
    explain_match,
    format_selector,
    matches,
    parse_selector,
    platform_constrained,
)
from controller.model import VM, Attr, Fact, Provenance

G, P, A = Provenance.GUEST, Provenance.PLATFORM, Provenance.AUTHORITATIVE


def vm(*facts: Fact, name: str = "fin-desk-1", hv: str = "hv1") -> VM:
    return VM(uuid="u1", name=name, hypervisor=hv, facts=frozenset(facts))


def tag(key: str, value: str) -> Fact:
    return Fact(Attr.TAG, key, value, P)


def user(name: str, prov: Provenance = G) -> Fact:
    return Fact(Attr.USER, "", name, prov, 10.0)


TAG_DEPT = Term(Attr.TAG, "dept")
USER = Term(Attr.USER)


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name == 'web-1'", Compare(Term(Attr.NAME), Op.EQ, "web-1")),
        ('hypervisor != "hv2"', Compare(Term(Attr.HYPERVISOR), Op.NE, "hv2")),
        ("os glob 'ubuntu-*'", Compare(Term(Attr.OS), Op.GLOB, "ubuntu-*")),
        ("user in {'alice', 'bob'}", In(USER, frozenset({"alice", "bob"}))),
        ("usergroup not in {'x'}", In(Term(Attr.USERGROUP), frozenset({"x"}), negated=True)),
        ("has(label)", Has(Term(Attr.LABEL))),
        ("app == 'postgres'", Compare(Term(Attr.APP), Op.EQ, "postgres")),
        ("tag.dept == 'finance'", Compare(TAG_DEPT, Op.EQ, "finance")),
        ("tag.k8s.io-x_1 == 'v'", Compare(Term(Attr.TAG, "k8s.io-x_1"), Op.EQ, "v")),
        ("has(posture.edr)", Has(Term(Attr.POSTURE, "edr"))),
        ("all()", All()),
        ("  all ( )  ", All()),
        ("!has(label)", Not(Has(Term(Attr.LABEL)))),
        ("!!has(label)", Not(Not(Has(Term(Attr.LABEL))))),
        (r"name == 'it\'s'", Compare(Term(Attr.NAME), Op.EQ, "it's")),
        (r'name == "a\\b"', Compare(Term(Attr.NAME), Op.EQ, "a\\b")),
        ("name == ''", Compare(Term(Attr.NAME), Op.EQ, "")),
    ],
)
def test_parses_every_construct(text: str, expected: Expr) -> None:
    assert parse_selector(text) == expected


def test_set_order_and_duplicates_do_not_matter() -> None:
    assert parse_selector("user in {'b', 'a', 'b'}") == parse_selector("user in {'a','b'}")


a = Has(Term(Attr.TAG, "a"))
b = Has(Term(Attr.TAG, "b"))
c = Has(Term(Attr.TAG, "c"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("has(tag.a) || has(tag.b) && has(tag.c)", Or(a, And(b, c))),
        ("has(tag.a) && has(tag.b) || has(tag.c)", Or(And(a, b), c)),
        ("!has(tag.a) && has(tag.b)", And(Not(a), b)),
        ("!(has(tag.a) && has(tag.b))", Not(And(a, b))),
        ("(has(tag.a) || has(tag.b)) && has(tag.c)", And(Or(a, b), c)),
        ("has(tag.a) && has(tag.b) && has(tag.c)", And(And(a, b), c)),
        ("has(tag.a) || has(tag.b) || has(tag.c)", Or(Or(a, b), c)),
    ],
)
def test_precedence(text: str, expected: Expr) -> None:
    assert parse_selector(text) == expected


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("", 1, "empty selector"),
        ("   ", 1, "empty selector"),
        ("tags.x == 'a'", 1, "unknown attribute 'tags.x' (use tag.KEY)"),
        ("name == 'a' && colour == 'red'", 16, "unknown attribute 'colour'"),
        ("tag == 'a'", 1, "'tag' needs a key"),
        ("posture. == 'pass'", 1, "'posture' needs a key"),
        ("name.x == 'a'", 1, "'name' takes no key"),
        ("app.postgres == 'x'", 1, "use app == 'NAME'"),
        ("tag.dept == finance", 13, "expected a quoted string after '=='"),
        ("tag.dept == 'finance", 13, "unterminated string"),
        ("tag.dept == 'a' junk", 17, "unexpected 'junk'"),
        ("tag.dept == 'a' 'b'", 17, "unexpected string 'b'"),
        ("tag.dept == 'a')", 16, "unexpected ')'"),
        ("(tag.dept == 'a'", 17, "expected ')' to close the '(' at column 1"),
        ("tag.dept = 'a'", 10, "unexpected character '='"),
        ("tag.dept", 9, "expected ==, !=, in, not in or glob"),
        ("tag.dept in 'a'", 13, "expected '{'"),
        ("tag.dept in {}", 14, "empty set"),
        ("tag.dept in {'a' 'b'}", 18, "expected '}'"),
        ("tag.dept not {'a'}", 14, "expected 'in' after 'not'"),
        ("has(tag.x", 10, "expected ')' to close has"),
        ("name == 'a' &&", 15, "expected an attribute"),
        ("all(x)", 5, "all() takes no arguments"),
        ("name == 'a' & user == 'b'", 13, "unexpected character '&'"),
    ],
)
def test_errors_name_problem_and_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(SelectorError) as info:
        parse_selector(text)
    assert info.value.column == column
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"column {column}: ")


def test_selector_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_selector("nope")


# --- formatting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ('tag.dept=="finance"', "tag.dept == 'finance'"),
        ("user in {'b','a'}", "user in {'a', 'b'}"),
        ("!(user == 'bob')", "!(user == 'bob')"),
        ("!user == 'bob'", "!(user == 'bob')"),
        ("(has(tag.a) && has(tag.b)) && has(tag.c)", "has(tag.a) && has(tag.b) && has(tag.c)"),
        ("has(tag.a) && (has(tag.b) && has(tag.c))", "has(tag.a) && (has(tag.b) && has(tag.c))"),
        ("(has(tag.a) || has(tag.b)) && has(tag.c)", "(has(tag.a) || has(tag.b)) && has(tag.c)"),
        ("has(tag.a) || (has(tag.b) && has(tag.c))", "has(tag.a) || has(tag.b) && has(tag.c)"),
        ('name == "it\'s"', r"name == 'it\'s'"),
    ],
)
def test_format_is_canonical(text: str, canonical: str) -> None:
    assert format_selector(parse_selector(text)) == canonical


_keys = st.from_regex(r"[A-Za-z0-9_.\-]{1,8}", fullmatch=True)
_terms = st.one_of(
    st.sampled_from(
        [Attr.NAME, Attr.HYPERVISOR, Attr.OS, Attr.USER, Attr.USERGROUP, Attr.APP, Attr.LABEL]
    ).map(Term),
    st.builds(Term, st.sampled_from([Attr.TAG, Attr.POSTURE]), _keys),
)
_values = st.text(max_size=8)
_leaves = st.one_of(
    st.builds(Compare, _terms, st.sampled_from(list(Op)), _values),
    st.builds(In, _terms, st.frozensets(_values, min_size=1, max_size=4), st.booleans()),
    st.builds(Has, _terms),
    st.just(All()),
)
exprs: st.SearchStrategy[Expr] = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.builds(Not, inner), st.builds(And, inner, inner), st.builds(Or, inner, inner)
    ),
    max_leaves=12,
)


@given(exprs)
def test_format_parse_round_trip(expr: Expr) -> None:
    text = format_selector(expr)
    assert parse_selector(text) == expr
    assert format_selector(parse_selector(text)) == text


def test_ast_nodes_are_hashable_values() -> None:
    e1 = parse_selector("tag.a == 'x' && user in {'a', 'b'}")
    e2 = parse_selector("tag.a=='x'&&user in {'b','a'}")
    assert e1 == e2 and hash(e1) == hash(e2)
    with pytest.raises(AttributeError):
        e1.left = All()  # type: ignore[misc]


# --- matching ------------------------------------------------------------------------------


def sel(text: str, v: VM) -> bool:
    return matches(parse_selector(text), v)


def test_platform_fields() -> None:
    v = vm(name="fin-desk-1", hv="hv1")
    assert sel("name == 'fin-desk-1'", v)
    assert sel("name glob 'fin-*'", v)
    assert not sel("name glob 'Fin-*'", v)  # case-sensitive
    assert sel("hypervisor in {'hv1', 'hv2'}", v)
    assert not sel("hypervisor != 'hv1'", v)
    assert sel("has(name) && has(hypervisor)", v)


def test_tags_compare_the_value_of_that_key() -> None:
    v = vm(tag("dept", "finance"), tag("role", "desktop"))
    assert sel("tag.dept == 'finance'", v)
    assert not sel("tag.dept == 'desktop'", v)
    assert sel("tag.role != 'server'", v)
    assert sel("has(tag.dept) && !has(tag.tier)", v)
    assert sel("tag.tier != 'web'", v)  # absent: != is the negation of ==
    assert not sel("tag.tier in {'web'}", v)
    assert sel("tag.tier not in {'web'}", v)


def test_multi_valued_attributes_match_if_any_value_matches() -> None:
    v = vm(
        user("alice"),
        user("bob"),
        Fact(Attr.USERGROUP, "", "finance", G),
        Fact(Attr.LABEL, "", "pci", G),
        Fact(Attr.LABEL, "", "pii", G),
    )
    assert sel("user == 'bob'", v)
    assert sel("user == 'alice'", v)
    assert not sel("user != 'bob'", v)  # negation of ==, not "some user is not bob"
    assert sel("user in {'carol', 'bob'}", v)
    assert not sel("user not in {'carol', 'bob'}", v)
    assert sel("user not in {'carol'}", v)
    assert sel("user glob 'al*'", v)
    assert sel("usergroup == 'finance'", v)
    assert sel("label == 'pii' && label == 'pci'", v)
    assert not sel("has(os)", v)


def test_app_compares_app_names() -> None:
    v = vm(Fact(Attr.APP, "postgres", "tcp/5432", G), Fact(Attr.APP, "sshd", "tcp/22", G))
    assert sel("app == 'postgres'", v)
    assert sel("app in {'nginx', 'sshd'}", v)
    assert not sel("app == 'tcp/5432'", v)
    assert sel("app glob 'post*'", v)
    assert sel("has(app)", v)
    assert not sel("has(app)", vm())


def test_posture_and_os() -> None:
    v = vm(
        Fact(Attr.POSTURE, "edr", "pass", G),
        Fact(Attr.POSTURE, "disk", "fail", G),
        Fact(Attr.OS, "", "ubuntu-22.04", G),
    )
    assert sel("posture.edr == 'pass' && posture.disk != 'pass'", v)
    assert not sel("posture.fw == 'pass'", v)
    assert sel("os glob 'ubuntu-*'", v)


def test_combinators() -> None:
    v = vm(tag("role", "desktop"), user("bob"))
    assert sel("all()", v)
    assert sel("tag.role == 'server' || user == 'bob'", v)
    assert not sel("tag.role == 'server' && user == 'bob'", v)
    assert sel("!(tag.role == 'server')", v)


# --- explanations --------------------------------------------------------------------------


def test_explain_names_the_deciding_facts_for_every_leaf() -> None:
    finance = tag("dept", "finance")
    bob = user("bob")
    v = vm(finance, bob)
    ok, evidence = explain_match(
        parse_selector("tag.dept == 'hr' || tag.dept == 'finance' && user == 'bob'"), v
    )
    assert ok
    assert evidence == (
        Evidence("tag.dept == 'hr'", False, (finance,)),
        Evidence("tag.dept == 'finance'", True, (finance,)),
        Evidence("user == 'bob'", True, (bob,)),
    )


def test_explain_does_not_short_circuit_and_reports_absent_facts() -> None:
    v = vm(user("bob"))
    ok, evidence = explain_match(parse_selector("has(tag.q) && !(user != 'bob') && all()"), v)
    assert not ok
    assert [e.term for e in evidence] == ["has(tag.q)", "user != 'bob'", "all()"]
    assert evidence[0] == Evidence("has(tag.q)", False, ())
    assert evidence[1].satisfied is False  # the leaf's own truth, before the enclosing !
    assert evidence[1].facts == (user("bob"),)


def test_explain_multi_valued_keeps_only_matching_facts() -> None:
    alice, bob = user("alice"), user("bob")
    _, (ev,) = explain_match(parse_selector("user in {'bob'}"), vm(alice, bob))
    assert ev == Evidence("user in {'bob'}", True, (bob,))
    _, (ev,) = explain_match(parse_selector("user == 'carol'"), vm(alice, bob))
    assert ev == Evidence("user == 'carol'", False, (alice, bob))


@given(exprs)
def test_explain_agrees_with_matches(expr: Expr) -> None:
    v = vm(tag("a", "x"), user("bob"), Fact(Attr.APP, "pg", "tcp/5432", G))
    assert explain_match(expr, v)[0] == matches(expr, v)


# --- static analysis -----------------------------------------------------------------------


def test_attrs_used() -> None:
    expr = parse_selector("tag.a == 'x' && !has(posture.edr) || app in {'pg'} || all()")
    assert attrs_used(expr) == frozenset({Attr.TAG, Attr.POSTURE, Attr.APP})
    assert attrs_used(All()) == frozenset()


@pytest.mark.parametrize(
    ("text", "constrained"),
    [
        ("usergroup == 'finance'", False),
        ("tag.role == 'desktop' && usergroup == 'finance'", True),
        ("usergroup == 'finance' && tag.role == 'desktop'", True),
        ("tag.a == 'x' || user == 'bob'", False),
        ("tag.a == 'x' || name glob 'web-*'", True),
        ("!has(tag.q) && user == 'bob'", False),
        ("tag.a != 'x' && user == 'bob'", False),
        ("tag.a not in {'x'} && user == 'bob'", False),
        ("tag.a in {'x'} && user == 'bob'", True),
        ("has(tag.a)", True),
        ("hypervisor == 'hv1'", True),
        ("name glob 'fin-*' && usergroup == 'finance'", True),
        ("!!has(tag.a)", False),
        ("!(tag.a != 'x')", False),
        ("all()", False),
        ("all() && user == 'bob'", False),
        ("posture.edr == 'pass'", False),
        ("os == 'linux' && app == 'pg' && label == 'pci'", False),
        ("(tag.a == 'x' || tag.b == 'y') && user == 'bob'", True),
    ],
)
def test_platform_constrained(text: str, constrained: bool) -> None:
    assert platform_constrained(parse_selector(text)) is constrained
