"""The grammar of symbolic shape expressions a ``.pt2`` may hold, checked before sympy sees them.

torch.export writes a symbolic size as ``sympy.srepr`` text, e.g.
``Add(FloorDiv(Add(Symbol('s0', positive=True, integer=True), Integer(-1)), Integer(2)), Integer(1))``,
and ``torch.export.load`` hands it to ``sympy.sympify``, which ``eval``s it: any Python
expression in a file runs. :func:`check_expression` accepts only calls of a fixed set of pure
sympy/torch functions on integers, numeric strings and ``Symbol('s0', ...)``; nothing else
(no attribute access, subscripts, other names or operators) gets through.

Pure Python, no torch, no sympy.
"""

from __future__ import annotations

import re
from typing import Any

SYMBOL_NAME = re.compile(r"(?:s|u|zf|zuf)[0-9]+\Z")
MAX_EXPR_CHARS = 4096
MAX_EXPR_DEPTH = 64

# Functions a symbolic shape expression may call: sympy's and torch.utils._sympy's
# arithmetic, comparisons and logic, all pure.
EXPR_FUNCTIONS = frozenset({
    "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
})
EXPR_CONSTANTS = frozenset({"true", "false", "oo", "int_oo", "zoo", "nan"})
SYMBOL_ASSUMPTIONS = frozenset({"positive", "integer", "nonnegative", "negative", "nonpositive",
                                "real", "finite", "extended_real", "rational", "zero", "nonzero"})



class Refusal(Exception):
    """Something in the file that would run code (or needs pickle) under torch.export.load."""


class Malformed(Exception):
    """The JSON does not have the shape of a torch.export program."""


def show(v: Any) -> str:
    """A short repr of a value for an error message."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


_TOKEN = re.compile(r"\s*(?:(?P<num>-?[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                    r"|(?P<str>'[^'\\]*')|(?P<op>[(),=-]))")


def check_expression(text: Any, where: str) -> str:
    """Accept a sympy ``srepr`` string built only from the grammar below; return it.

    ``expr := NUMBER | CONST | FUNC '(' [arg {',' arg}] ')' | 'Symbol' '(' SYMNAME {',' KW '=' BOOL} ')'``
    where FUNC is one of :data:`EXPR_FUNCTIONS`, ``arg := expr | NUMERIC_STRING`` (for
    ``Float('0.5', precision=53)``: ``KW '=' NUMBER`` is also allowed there), SYMNAME is
    ``'s0'``-style. Nothing else (no attribute access, no subscripts, no other names).
    """
    if type(text) is not str or len(text) > MAX_EXPR_CHARS:
        raise Refusal(f"{where}: symbolic expression is not a string of at most {MAX_EXPR_CHARS} characters")
    tokens: list[tuple[str, str]] = []
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if not m:
            raise Refusal(f"{where}: symbolic expression {show(text)} is outside the accepted grammar "
                          f"(at character {pos}); torch.export.load would eval it")
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    parser = _ExprParser(tokens, text, where)
    parser.expr(0)
    if parser.i != len(tokens):
        parser.fail()
    return text


class _ExprParser:
    def __init__(self, tokens: list[tuple[str, str]], text: str, where: str) -> None:
        self.tokens, self.text, self.where, self.i = tokens, text, where, 0

    def fail(self) -> None:
        raise Refusal(f"{self.where}: symbolic expression {show(self.text)} is outside the accepted "
                      "grammar; torch.export.load would eval it")

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, kind: str, value: str | None = None) -> str:
        k, v = self.peek()
        if k != kind or (value is not None and v != value):
            self.fail()
        self.i += 1
        return v

    def expr(self, depth: int) -> None:
        if depth > MAX_EXPR_DEPTH:
            self.fail()
        kind, value = self.peek()
        if kind == "num":
            self.i += 1
            return
        if kind == "op" and value == "-":  # -oo
            self.i += 1
            if self.take("name") not in ("oo", "int_oo"):
                self.fail()
            return
        func = self.take("name")
        if func in EXPR_CONSTANTS:
            return
        if func == "Symbol":
            self.take("op", "(")
            sym = self.take("str")[1:-1]
            if not SYMBOL_NAME.match(sym):
                self.fail()
            while self.peek() == ("op", ","):
                self.i += 1
                if self.take("name") not in SYMBOL_ASSUMPTIONS:
                    self.fail()
                self.take("op", "=")
                if self.take("name") not in ("True", "False"):
                    self.fail()
            self.take("op", ")")
            return
        if func not in EXPR_FUNCTIONS:
            self.fail()
        self.take("op", "(")
        if self.peek() == ("op", ")"):
            self.i += 1
            return
        while True:
            kind, value = self.peek()
            if kind == "str":  # Float('1.5', precision=53)
                if func != "Float" or not re.fullmatch(r"'-?[0-9.e+-]+'", value):
                    self.fail()
                self.i += 1
            elif kind == "name" and self.i + 1 < len(self.tokens) and self.tokens[self.i + 1] == ("op", "="):
                if func != "Float" or value != "precision":
                    self.fail()
                self.i += 2
                self.take("num")
            else:
                self.expr(depth + 1)
            if self.peek() == ("op", ","):
                self.i += 1
                continue
            self.take("op", ")")
            return
