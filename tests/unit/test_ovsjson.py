"""topology.ovsjson.FastParser reads a JSON-RPC stream exactly as python-ovs's own parser does:
the same values, the same message boundaries, the same errors, however the stream is chunked."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import ovs.json
import pytest

from topology import ovsjson
from topology.ovsjson import FastParser

PyParser = ovsjson._PY_PARSER
python_ovs = ovsjson._py_parser  # python-ovs's parser, installed or not


def messages(parser_class: Any, stream: str, chunks: list[int]) -> list[Any]:
    """Values (or error strings) of every message in `stream`, fed in chunks as
    ovs.jsonrpc.Connection.recv feeds its parser (unconsumed input is fed again)."""
    out: list[Any] = []
    parser = None
    pending = ""
    pos = 0
    sizes = iter(chunks)
    while True:
        if not pending:
            if pos >= len(stream):
                break
            size = next(sizes, 4096)
            pending, pos = stream[pos:pos + size], pos + size
            continue
        if parser is None:
            parser = parser_class()
        pending = pending[parser.feed(pending):]
        if parser.is_done():
            value = parser.finish()
            out.append(value)
            parser = None
            if isinstance(value, str):
                break  # python-ovs closes the connection on a parse error
    if parser is not None:
        out.append(("unfinished", parser.finish()))
    return out


def same_as_python_ovs(stream: str, seed: int = 0) -> list[Any]:
    rng = random.Random(seed)
    chunkings = [[len(stream) or 1], [1] * len(stream), [rng.randint(1, 9) for _ in stream],
                 [rng.randint(1, 200) for _ in stream]]
    expected = messages(python_ovs, stream, [len(stream) or 1])
    for chunks in chunkings:
        got = messages(FastParser, stream, chunks)
        assert got == expected, (stream[:200], chunks[:20])
        assert [type(v) for v in _leaves(got)] == [type(v) for v in _leaves(expected)]
    return expected


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for k, v in sorted(value.items()) for leaf in (k, *_leaves(v))]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def test_an_ovsdb_update_stream_reads_the_same() -> None:
    rows = {f"{i:08x}-0000-4000-8000-000000000000": {"initial": {
        "name": f"vm{i}", "ofport": i, "external_ids": ["map", [["attached-mac", f"02:00:00:00:{i // 256:02x}:{i % 256:02x}"],
                                                               ["iface-id", f"x{{[\"{i}\"]}}"]]]}} for i in range(300)}
    reply = json.dumps({"id": 3, "result": {"Interface": rows}, "error": None})
    update = json.dumps({"id": None, "method": "update3", "params": ["monid", "0000", {"Bridge": {}}]})
    got = same_as_python_ovs(reply + update + "\n" + reply)
    assert len(got) == 3 and got[0]["result"]["Interface"] == rows
    parser = FastParser()
    assert parser.feed(reply + update) == len(reply) and parser.finish() == json.loads(reply)
    assert parser._fallback is None  # read by the fast path, not handed to python-ovs's parser


@pytest.mark.parametrize("text", [
    '{"a": "brackets ] } [ { in a string", "b": ["\\"quoted\\" \\\\", "\\\\"]}',
    ('[1, -0, 0.0, -0.0, 1.0, 1.50, 1e2, 1E-2, 12.5e1, 9223372036854775807, -9223372036854775808, '
     '9223372036854775808, -9223372036854775809, 123456789012345678901234567890, 1.5e300, true, false, null]'),
    '  \n\t{"nested": {"deep": [[[[{}]]]], "empty": [], "obj": {}}}  ',
    '{"escapes": "\\n\\t\\r\\b\\f\\/"}',
    '{"unicode": "h\\u00e9llo \\u00e9", "pair": "\\ud83d\\ude00"}',
    '{"utf8": "h\u00e9llo \U0001f600"}',
    '{"dup": 1, "dup": 2}',
])
def test_values_read_the_same(text: str) -> None:
    same_as_python_ovs(text + text)


@pytest.mark.parametrize("text", [
    '{"a": 1,}', '{"a" 1}', '{]', '[1 2]', '{"a": tru}', '{"a": NaN}', '[Infinity]', '[-Infinity]',
    '[01]', '[1.]', '[-]', '[1e]', '[1e999]', '"a string"', '42', 'null', '}', '{"nul": "\\u0000"}',
    '{"lone": "\\ud83d"}', '{"bad": "\\x"}', '{"ctl": "a\u0001b"}', '{"a": 1}}', '[' * 1100 + ']' * 1100,
    '', '   ', '{"unfinished": [1, 2', '{"open string',
])
def test_errors_read_the_same(text: str) -> None:
    same_as_python_ovs(text)


def test_random_documents_in_random_chunks_read_the_same() -> None:
    rng = random.Random(7)

    def value(depth: int) -> Any:
        kind = rng.randrange(7 if depth < 4 else 4)
        if kind == 0:
            return rng.choice([0, -1, 7, 2 ** 40, -(2 ** 62), 0.5, -2.25, True, False, None])
        if kind in (1, 2, 3):
            return "".join(rng.choice('ab{}[]"\\,: /\u00e9') for _ in range(rng.randrange(8)))
        if kind in (4, 5):
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {value(9) if rng.random() < 0.9 else "k": value(depth + 1) for _ in range(rng.randrange(4))}

    for seed in range(60):
        docs = [json.dumps({"id": i, "result": value(0)}, ensure_ascii=False) for i in range(3)]
        stream = rng.choice(["", " ", "\n"]).join(docs)
        same_as_python_ovs(stream, seed)


def test_install_replaces_only_the_pure_python_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ovs.json, "Parser", PyParser)
    documents = ['{"a": [1]}', '{"a": 1} x', '{"a": [1]} ']
    before = [ovs.json.from_string(d) for d in documents]
    monkeypatch.setattr(ovs.json, "PARSER", ovs.json.PARSER_C)
    ovsjson.install()
    assert ovs.json.Parser is PyParser  # the C parser stays
    monkeypatch.setattr(ovs.json, "PARSER", ovs.json.PARSER_PY)
    ovsjson.install()
    assert ovs.json.Parser is FastParser
    # Whole documents (schema files) keep python-ovs's parser, trailing-garbage check included,
    # and python-ovs's parser still works with FastParser in its place (the fallback uses it).
    assert [ovs.json.from_string(d) for d in documents] == before
    assert before[0] == before[2] == {"a": [1]} and isinstance(before[1], str)
    assert messages(FastParser, '{"nul": "\\u0000"} {"a": 1}', [5]) == messages(python_ovs, '{"nul": "\\u0000"}', [99])
    assert messages(FastParser, '{"a": "\\u00e9"}', [3]) == [{"a": "\u00e9"}]


@pytest.mark.parametrize("text", ['{"a": [1, 2.0]}', ' [true] \n', '{"a": 1} x', '{"a": 1} {}', '', '{"a": "\\u0000"}', '[1'])
def test_whole_documents_read_the_same(text: str) -> None:
    assert ovsjson.from_string(text) == python_ovs_document(text)


def test_the_ovsdb_schema_file_reads_the_same(tmp_path: Any) -> None:
    schema = Path("/usr/share/openvswitch/vswitch.ovsschema")
    text = schema.read_text() if schema.is_file() else json.dumps({"name": "x", "version": "1.0.0", "tables": {}})
    (tmp_path / "s.json").write_text(text)
    assert ovsjson.from_file(str(tmp_path / "s.json")) == python_ovs_document(text)


def python_ovs_document(text: str) -> Any:
    parser = python_ovs(check_trailer=True)
    parser.feed(text)
    return parser.finish()
