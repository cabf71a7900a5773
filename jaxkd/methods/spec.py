"""Methods by name: ``parse("ce + 0.9 * kd(temperature=4)")`` builds the same chain as the Python code.

Configs and command lines name methods with this small expression language, so every registered
method is selectable from an experiment config. Grammar (a safe subset of Python, evaluated without
``eval``): a sum of terms; a term is ``[number *] name[(keyword=literal, ...)]``; ``name`` is a key of
:data:`REGISTRY`. Literals are numbers, strings, booleans, ``None`` and tuples of those, or a name from
the ``constants`` passed to :func:`parse` (e.g. ``taid(total_steps=steps)`` with ``{"steps": 400}``).
"""

from __future__ import annotations

import ast
from typing import Callable, Mapping

from jaxkd.methods.base import Method, chain
from jaxkd.methods import divergences as div
from jaxkd.methods import logit_methods as lm
from jaxkd.methods.dual_head import dhkd, dho
from jaxkd.methods.fantastic_gains import kd_dp
from jaxkd.methods.logit import ce, kd
from jaxkd.methods.taid import taid
from jaxkd.methods.tgeo import tgeo_kd

REGISTRY: dict[str, Callable[..., Method]] = {
    "ce": ce,
    "kd": kd,
    "taid": taid,
    "kd_dp": kd_dp,
    "dho": dho,
    "dhkd": dhkd,
    "tgeo_kd": tgeo_kd,
    "fkl": div.forward_kl,
    "rkl": div.reverse_kl,
    "jsd": div.jsd,
    "gjsd": div.gjsd,
    "skl": div.skl,
    "srkl": div.srkl,
    "tvd": div.tvd,
    "ab": div.ab,
    "sparse_kd": div.sparse_kd,
    "dkd": lm.dkd,
    "kd_ls": lm.kd_ls,
    "dist": lm.dist,
    "nkd": lm.nkd,
    "pld": lm.pld,
    "sinkd": lm.sinkd,
    "bdkd": lm.bdkd,
    "swing": lm.swing,
}


def register(name: str, factory: Callable[..., Method]) -> None:
    """Makes ``factory`` selectable by ``name`` in :func:`parse` (for methods defined outside jaxkd)."""
    if name in REGISTRY and REGISTRY[name] is not factory:
        raise ValueError(f"a method named {name!r} is already registered")
    REGISTRY[name] = factory


def _literal(node: ast.AST, source: str, constants: Mapping[str, object]):
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(
            f"method arguments must be literals, got {ast.get_source_segment(source, node)!r} in {source!r}"
        ) from None


def _term(node: ast.AST, source: str, constants: Mapping[str, object]) -> Method:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        left, right = node.left, node.right
        if isinstance(right, ast.Constant):
            left, right = right, left
        weight = _literal(left, source, constants)
        if not isinstance(weight, (int, float)):
            raise ValueError(f"a method weight must be a number, got {weight!r} in {source!r}")
        return float(weight) * _term(right, source, constants)
    if isinstance(node, ast.Name):
        name, kwargs = node.id, {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.args:
            raise ValueError(f"method arguments must be keywords (name=value) in {source!r}")
        name = node.func.id
        kwargs = {kw.arg: _literal(kw.value, source, constants) for kw in node.keywords}
    else:
        raise ValueError(f"cannot read {ast.get_source_segment(source, node)!r} as a method in {source!r}")
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


def _terms(node: ast.AST, source: str, constants: Mapping[str, object]) -> list[Method]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _terms(node.left, source, constants) + _terms(node.right, source, constants)
    return [_term(node, source, constants)]


def parse(spec: str, constants: Mapping[str, object] | None = None) -> Method:
    """Builds a method chain from a string such as ``"ce(label_smoothing=0.1) + 0.9*kd(temperature=4)"``.

    ``constants`` names values the spec may use as arguments (the experiment passes ``steps``).
    """
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse method spec {spec!r}: {e.msg}") from None
    return chain(*_terms(tree.body, spec, dict(constants or {})))
