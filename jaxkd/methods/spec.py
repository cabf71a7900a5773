"""Methods by name: ``parse("ce + 0.9 * kd(temperature=4)")`` builds the same chain as the Python code.

Configs and command lines name methods with this small expression language, so every registered
method is selectable from an experiment config. Grammar (a safe subset of Python, evaluated without
``eval``): a sum of terms; a term is ``[number *] name[(keyword=value, ...)]`` where ``name`` is a key of
:data:`jaxkd.methods.REGISTRY`. Values are literals (numbers, strings, booleans, ``None``, tuples) or
arithmetic (``+ - * / // **``) over numbers and the named ``constants`` passed to :func:`parse` —
``taid(total_steps=steps)`` or ``dkd(warmup_steps=steps // 12)`` with ``{"steps": 400}``. An integer
result over :data:`MAX_INT_BITS` bits (``9**9**9``) is refused before it is computed. Weights may be
arithmetic too: ``0.0008 * batch_size * sinkd``. A weight may also be a stage, ``until(n)`` (1 before
step ``n``, then 0) or ``after(n)`` (0 before, then 1), optionally times a number:
``until(100) * fitnets + after(100) * (ce + kd)`` is FitNets' two-stage recipe in one run.
"""

from __future__ import annotations

import ast
import difflib
import operator
from typing import Any, Mapping

from jaxkd.methods.base import Method, after, chain, multiply_weights, until
from jaxkd.methods.registry import REGISTRY, resolve

__all__ = ["parse"]

#: Weight schedules a spec may call (their names are not method names).
_STAGES = {"until": until, "after": after}

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}


#: The largest integer a spec may compute, in bits (beyond any float, so no sensible argument is lost).
#: Python's integer arithmetic is exact and unbounded: ``9**9**9`` would run for hours (and cannot be
#: interrupted), so powers are refused before they are computed and other results after.
MAX_INT_BITS = 1024


def _checked_arithmetic(op: type, left: int | float, right: int | float) -> int | float:
    """``left op right``; ValueError for an integer result of more than :data:`MAX_INT_BITS` bits."""
    if op is ast.Pow and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        # |left| ** right has at least (bit_length - 1) * right + 1 bits: bound it before computing.
        if (abs(left).bit_length() - 1) * right >= MAX_INT_BITS:
            raise ValueError(f"the integer result is too large (over {MAX_INT_BITS} bits)")
    result = _OPERATORS[op](left, right)
    if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
        raise ValueError(f"the integer result is too large (over {MAX_INT_BITS} bits)")
    return result


class _Reader:
    """Reads one spec; every error names the offending piece and the whole spec."""

    def __init__(self, source: str, constants: Mapping[str, Any]):
        self.source, self.constants = source, dict(constants)

    def error(self, message: str, node: ast.AST | None = None) -> ValueError:
        piece = "" if node is None else f" at {ast.get_source_segment(self.source, node)!r}"
        return ValueError(f"{message}{piece} in method spec {self.source!r}")

    def value(self, node: ast.AST) -> Any:
        """A literal, a named constant, or arithmetic over numbers and constants."""
        if isinstance(node, ast.Name):
            if node.id in self.constants:
                return self.constants[node.id]
            raise self.error(f"unknown name {node.id!r} (known constants: {sorted(self.constants)})", node)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = self.number(node.left), self.number(node.right)
            try:
                return _checked_arithmetic(type(node.op), left, right)
            except (ArithmeticError, ValueError) as e:
                raise self.error(f"cannot compute ({e})", node) from None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            number = self.number(node.operand)
            return -number if isinstance(node.op, ast.USub) else number
        try:
            return ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError):
            raise self.error("method arguments must be literals, named constants or arithmetic", node) from None

    def number(self, node: ast.AST) -> int | float:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"expected a number, got {value!r}", node)
        return value

    def is_stage(self, node: ast.AST) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _STAGES

    def weight(self, node: ast.AST):
        """A number, a stage ``until(n)`` / ``after(n)``, or a number times a stage."""
        if self.is_stage(node):
            if len(node.args) != 1 or node.keywords:
                raise self.error(f"{node.func.id}() takes one argument, a step count", node)
            try:
                return _STAGES[node.func.id](self.number(node.args[0]))
            except ValueError as e:
                raise self.error(str(e), node) from None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and (
            self.is_stage(node.left) or self.is_stage(node.right)
        ):
            left, right = self.weight(node.left), self.weight(node.right)
            try:
                return multiply_weights(left, right)
            except ValueError as e:
                raise self.error(f"bad weight: {e}", node) from None
        return self.number(node)

    def is_method(self, node: ast.AST) -> bool:
        if self.is_stage(node):
            return False
        if isinstance(node, ast.Call):
            return True
        if isinstance(node, ast.Name):
            return node.id not in self.constants
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.is_method(node.left) or self.is_method(node.right)  # a parenthesized sum of methods
        return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and (
            self.is_method(node.left) or self.is_method(node.right)
        )

    def term(self, node: ast.AST) -> Method:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            left, right = node.left, node.right
            if self.is_method(left) and self.is_method(right):
                raise self.error("two methods cannot be multiplied", node)
            if self.is_method(left):
                left, right = right, left
            if not self.is_method(right):
                raise self.error("a term must name a method", node)
            weight = self.weight(left)
            # `w * (a + b)` weights every member of the sum.
            is_sum = isinstance(right, ast.BinOp) and isinstance(right.op, ast.Add)
            method = chain(*self.terms(right)) if is_sum else self.term(right)
            try:
                return weight * method
            except ValueError as e:
                raise self.error(f"bad weight: {e}", left) from None
        if isinstance(node, ast.Name):
            name, kwargs = node.id, {}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            if node.args or any(kw.arg is None for kw in node.keywords):
                raise self.error("method arguments must be keywords (name=value)", node)
            kwargs = {}
            for kw in node.keywords:
                if kw.arg in kwargs:
                    raise self.error(f"keyword {kw.arg!r} is given twice", node)
                kwargs[kw.arg] = self.value(kw.value)
        else:
            raise self.error("cannot read this as a method", node)
        name = resolve(name)
        if name not in REGISTRY:
            close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(f"unknown method {name!r}{hint}; registered methods: {sorted(REGISTRY)}", node)
        try:
            return REGISTRY[name].factory(**kwargs)
        except (TypeError, ValueError) as e:  # an unknown keyword or a bad value, named with its method
            raise self.error(f"{name}: {e}", node) from None

    def terms(self, node: ast.AST) -> list[Method]:
        """The terms of ``a + b + c`` (a left-deep tree), read without recursion: specs may be long."""
        right_terms = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            right_terms.append(node.right)
            node = node.left
        return [self.term(n) for n in [node, *reversed(right_terms)]]


def parse(spec: str, constants: Mapping[str, Any] | None = None) -> Method:
    """Builds a method chain from a string such as ``"ce(label_smoothing=0.1) + 0.9*kd(temperature=4)"``.

    ``constants`` names values the spec may use in arguments and weights (the experiment passes
    ``steps`` and ``batch_size``). Every mistake — an unknown method or keyword, a repeated keyword, a
    string where a number belongs, a non-finite or negative weight — raises ``ValueError``.
    """
    if not isinstance(spec, str):
        raise ValueError(f"a method spec must be a string such as 'ce + kd(temperature=4)', got {spec!r}")
    constants = dict(constants or {})
    clash = sorted(set(constants) & set(REGISTRY))
    if clash:
        raise ValueError(f"constants {clash} have the names of registered methods")
    source = spec.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse method spec {spec!r}: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise ValueError(f"method spec is too deeply nested to parse ({len(spec)} characters)") from None
    return chain(*_Reader(source, constants).terms(tree.body))
