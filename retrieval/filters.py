"""The filter language of ``mmrag search --filter`` and ``Query.filter``, compiled to a Milvus expression.

    EXPR  := OR ;  OR := AND ("or" AND)* ;  AND := NOT ("and" NOT)* ;  NOT := "not" NOT | ATOM
    ATOM  := "(" EXPR ")" | FIELD OP VALUE | FIELD "in" "[" VALUE ("," VALUE)* "]" | FIELD "like" STRING
    FIELD := source | doc_id | id | modality | page | meta.KEY      (any metadata key: meta.title, meta.category)
    OP    := == | != | < | <= | > | >=
    VALUE := "string" | 'string' | number | true | false

Examples: ``modality == "image"``, ``page >= 3 and page <= 5``, ``source like "*.pdf"``,
``meta.category in ["animals", "food"]``. Values are re-quoted, never pasted, so a filter cannot inject Milvus
syntax; unknown fields and malformed expressions raise ``BadInputError`` naming the problem.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from mmrag.errors import BadInputError

FIELDS: dict[str, str] = {"source": "str", "doc_id": "str", "id": "str", "modality": "str", "page": "int"}
MAX_FILTER_CHARS = 2000
_TOKEN = re.compile(r"""\s*(?:(?P<num>-?\d+(?:\.\d+)?)|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|"""
                    r"""(?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)|(?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_\-]+)?))""")
_META_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise BadInputError(f"malformed filter at position {pos}: {text[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        tokens.append(_Tok(kind, match.group(kind), match.start(kind)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise BadInputError(f"malformed filter: {self.text!r} ends early"
                                + (f" (expected {expected!r})" if expected else ""))
        if expected is not None and tok.text.lower() != expected:
            raise BadInputError(f"malformed filter: expected {expected!r} at position {tok.pos}, found {tok.text!r}")
        self.i += 1
        return tok

    def parse(self) -> str:
        if not self.tokens:
            raise BadInputError("empty filter expression")
        expr = self.or_()
        if self.peek() is not None:
            tok = self.peek()
            raise BadInputError(f"malformed filter: unexpected {tok.text!r} at position {tok.pos}")
        return expr

    def or_(self) -> str:
        parts = [self.and_()]
        while (tok := self.peek()) is not None and tok.kind == "word" and tok.text.lower() == "or":
            self.take()
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else "(" + " or ".join(parts) + ")"

    def and_(self) -> str:
        parts = [self.not_()]
        while (tok := self.peek()) is not None and tok.kind == "word" and tok.text.lower() == "and":
            self.take()
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else "(" + " and ".join(parts) + ")"

    def not_(self) -> str:
        tok = self.peek()
        if tok is not None and tok.kind == "word" and tok.text.lower() == "not":
            self.take()
            return f"(not ({self.not_()}))"
        return self.atom()

    def atom(self) -> str:
        tok = self.take()
        if tok.text == "(":
            inner = self.or_()
            self.take(")")
            return inner
        if tok.kind != "word":
            raise BadInputError(f"malformed filter: expected a field name at position {tok.pos}, found {tok.text!r}")
        field, kind = _field(tok.text)
        op = self.take()
        if op.kind == "word" and op.text.lower() == "in":
            self.take("[")
            values = [self.value(kind, field)]
            while (nxt := self.take()).text == ",":
                values.append(self.value(kind, field))
            if nxt.text != "]":
                raise BadInputError(f"malformed filter: expected ']' at position {nxt.pos}, found {nxt.text!r}")
            if kind == "any":  # a metadata key: spelled out, as not every Milvus takes `in` on a JSON path
                return "(" + " or ".join(f"{field} == {v}" for v in values) + ")"
            return f"{field} in [{', '.join(values)}]"
        if op.kind == "word" and op.text.lower() == "like":
            if kind == "int":
                raise BadInputError(f"filter field {tok.text!r} is a number: 'like' needs a text field")
            pattern = self.take()
            if pattern.kind != "str":
                raise BadInputError(f"malformed filter: 'like' needs a quoted pattern at position {pattern.pos}")
            glob = _unquote(pattern.text).replace("%", r"\%").replace("*", "%")
            return f"{field} like {_literal(glob)}"
        if op.kind != "op" or op.text not in {"==", "!=", "<", "<=", ">", ">="}:
            raise BadInputError(f"malformed filter: expected a comparison after {tok.text!r} at position {op.pos}, "
                                f"found {op.text!r}")
        return f"{field} {op.text} {self.value(kind, field)}"

    def value(self, kind: str, field: str) -> str:
        tok = self.take()
        if tok.kind == "str":
            if kind == "int":
                raise BadInputError(f"filter field {field!r} is a number; got {tok.text}")
            return _literal(_unquote(tok.text))
        if tok.kind == "num":
            if kind == "str":
                return json.dumps(tok.text)
            return tok.text
        if tok.kind == "word" and tok.text.lower() in {"true", "false"}:
            return tok.text.lower()
        raise BadInputError(f"malformed filter: expected a value at position {tok.pos}, found {tok.text!r}")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _literal(value: str) -> str:
    """A Milvus string literal. JSON quoting escapes control characters as \\b, \\f or \\uXXXX, which not every
    Milvus parses (milvus-lite 3 refuses them as unknown escapes): such values are refused here instead."""
    bad = _CONTROL.search(value)
    if bad:
        raise BadInputError(f"filter value {value!r} holds the control character {bad.group()!r}")
    return json.dumps(value, ensure_ascii=False)


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def _field(name: str) -> tuple[str, str]:
    if name in FIELDS:
        return name, FIELDS[name]
    if name.startswith("meta."):
        key = name[5:]
        if not _META_KEY.match(key):
            raise BadInputError(f"invalid metadata key {key!r} in filter")
        return f'meta["{key}"]', "any"
    if name == "tenant":
        raise BadInputError("filter field 'tenant' is not allowed: choose the tenant with --tenant")
    raise BadInputError(f"unknown filter field {name!r}: use one of {', '.join(FIELDS)} or meta.KEY")


def compile_filter(text: str | None) -> str:
    """A Milvus boolean expression for a filter, or "" for no filter."""
    if text is None or not text.strip():
        return ""
    if len(text) > MAX_FILTER_CHARS:
        raise BadInputError(f"filter is {len(text)} characters; the limit is {MAX_FILTER_CHARS}")
    return _Parser(text).parse()
