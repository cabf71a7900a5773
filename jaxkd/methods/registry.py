"""The method registry: every built-in method registers itself, with the paper it implements and the
loss functions behind it, in one line in its own module::

    @register("dkd", paper="Zhao et al., *Decoupled Knowledge Distillation*, CVPR 2022", losses=("dkd",))
    def dkd(...) -> Method: ...

:func:`jaxkd.methods.parse` selects methods by these names, and :func:`method_table` renders the
README's method table from them (a test keeps the README in sync), so adding a method touches only the
method's own files.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

from jaxkd.methods.base import Method

__all__ = ["ALIASES", "CONTRACTS", "INPUTS", "LEADING_METHODS", "LOGIT_ROLES", "REGISTRY", "Registered", "method_table", "register", "resolve"]


@dataclasses.dataclass(frozen=True)
class Registered:
    """A registered method: its factory and what the method table says about it."""

    name: str
    factory: Callable[..., Method]
    paper: str = ""
    losses: tuple[str, ...] = ()
    status: str = "supported"
    #: A contract the tests check for every method that declares it (:data:`CONTRACTS`); ``""`` for none.
    contract: str = ""
    #: What its participants must produce (:data:`INPUTS`).
    inputs: str = "classifier"
    #: The arguments of a small valid spec (``"total_steps=10"`` for TAID): what a factory needs that has no
    #: default, and settings that keep a smoke run small. Tests and docs build ``f"{name}({example})"``.
    example: str = ""
    #: Compares feature maps channel by channel (FSP, KD-SVD): teacher and student maps must be as wide.
    same_width: bool = False


#: What a method's participants must produce: ``"classifier"`` — logits and, for feature methods, the
#: ``pooled`` / hidden features any classifier of :mod:`jaxkd.models` taps; ``"feature_maps"`` — spatial stage
#: maps (RepDistiller's taps: ``stem``, ``stage1-3``, ``*_preact``), i.e. a convolutional network;
#: ``"tokens"`` — a language model over ``{"tokens", "mask"}`` rows; ``"two_tokenizations"`` — teacher and
#: student language models over two tokenizations of the same text (ALM's parallel rows).
INPUTS = ("classifier", "feature_maps", "tokens", "two_tokenizations")


#: The contract of methods whose loss compares the logits of the participant in the ``student`` role with
#: those of the participant in the ``teacher`` role (read as a gradient-stopped target), and whose factory
#: takes those roles as ``student=`` / ``teacher=``: ``dkd(student="peer", teacher="student")``.
LOGIT_ROLES = "logit_roles"
#: The contracts a method may declare at registration (its family is its folder: :func:`folder_of`).
CONTRACTS = ("", LOGIT_ROLES)


#: The methods the method table lists first, in this order (the cross-entropy, Hinton's KD and the divergences:
#: the building blocks every other method is compared with); the others follow by family, then by name.
LEADING_METHODS = ("ce", "kd", "forward_kl", "reverse_kl", "js_divergence", "generalized_jsd", "skew_kl",
                   "skew_reverse_kl", "total_variation", "alpha_beta_divergence", "sparse_forward_kl")


#: name -> :class:`Registered`, for every method :func:`jaxkd.methods.parse` can build.
REGISTRY: dict[str, Registered] = {}

#: Former spec names -> current ones: a method's name is its factory's and its loss function's. The old names
#: still parse, with one ``FutureWarning`` naming the new one.
ALIASES = {
    "fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "js_divergence", "gjsd": "generalized_jsd", "skl": "skew_kl",
    "srkl": "skew_reverse_kl", "tvd": "total_variation", "ab": "alpha_beta_divergence", "abound": "activation_boundary",
    "ft": "factor_transfer", "sparse_kd": "sparse_forward_kl",
}


def resolve(name: str) -> str:
    """The registered name ``name`` stands for (itself, or the current name of a former one, with a warning)."""
    new = ALIASES.get(name)
    if new is None or name in REGISTRY:
        return name
    warnings.warn(f"method name {name!r} is deprecated: use {new!r} (a method's name is its loss function's)",
                  FutureWarning, stacklevel=3)
    return new


def register(
    name: str,
    factory: Callable[..., Method] | None = None,
    *,
    paper: str = "",
    losses: tuple[str, ...] = (),
    status: str = "supported",
    contract: str = "",
    inputs: str = "classifier",
    example: str = "",
    same_width: bool = False,
):
    """Makes ``factory`` selectable by ``name`` in :func:`jaxkd.methods.parse`.

    Use it as a decorator on a built-in factory (with the paper and the ``jaxkd.losses`` functions it
    uses, for the method table) or call it with a factory defined outside jaxkd:
    ``register("my_kd", my_kd)``. ``contract`` names a contract the tests check for every method
    declaring it (:data:`LOGIT_ROLES`); ``""`` for none. ``inputs`` (:data:`INPUTS`), ``example`` and ``same_width`` say
    what the method needs, so tests and tools build a working instance from the registry alone.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a registered name must be a Python identifier (it is parsed), got {name!r}")
    if contract not in CONTRACTS:
        raise ValueError(f"register({name!r}): contract must be one of {CONTRACTS}, got {contract!r}")
    if inputs not in INPUTS:
        raise ValueError(f"register({name!r}): inputs must be one of {INPUTS}, got {inputs!r}")

    def add(fn: Callable[..., Method]) -> Callable[..., Method]:
        if not callable(fn):
            raise ValueError(f"register({name!r}) needs a factory function returning a Method, got {fn!r}")
        existing = REGISTRY.get(name)
        if existing is not None and existing.factory is not fn:
            raise ValueError(f"a method named {name!r} is already registered")
        REGISTRY[name] = Registered(name, fn, paper, tuple(losses), status, contract, inputs, example, bool(same_width))
        return fn

    return add if factory is None else add(factory)


def folder_of(entry: Registered) -> str:
    """The family folder of a built-in method's module (``logit`` for ``jaxkd.methods.logit.dkd``): the
    method table's first column, so the table reads like the folder tree."""
    parts = entry.factory.__module__.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["jaxkd", "methods"] else ""


def method_table() -> str:
    """The README's method table (Markdown), one row per registered built-in method."""
    rows = ["| family | name (`methods.parse`) | paper | loss functions (`jaxkd.losses`) | status |",
            "|---|---|---|---|---|"]
    folders = ("logit", "feature", "lm", "fusion", "merge", "augment", "")  # jaxkd.methods.FAMILIES, then user-registered ones

    def order(entry: Registered):
        lead = LEADING_METHODS.index(entry.name) if entry.name in LEADING_METHODS else len(LEADING_METHODS)
        return folders.index(folder_of(entry)), lead, entry.name

    for entry in sorted(REGISTRY.values(), key=order):
        if not entry.paper:  # user-registered methods are not part of the table
            continue
        losses = ", ".join(f"`{fn}`" for fn in entry.losses)
        rows.append(f"| {folder_of(entry)} | `{entry.name}` | {entry.paper} | {losses} | {entry.status} |")
    return "\n".join(rows)
