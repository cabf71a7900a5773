"""Package plumbing: export every public name of a package's modules from the package itself, and keep
former names resolving (with a warning) after a rename."""

from __future__ import annotations

import importlib
import pkgutil
import types
import warnings
from typing import Any, Iterable, Mapping, MutableMapping


def export_modules(
    namespace: MutableMapping[str, Any], *, skip: Iterable[str] = (), first: Iterable[str] = ()
) -> list[str]:
    """Imports every module of the package whose ``__init__`` namespace is given (except ``skip``; the
    ``first`` ones first, then the rest alphabetically) and copies the names of each module's ``__all__``
    into it. Returns the exported names.

    This is how a new loss or method is one new file: nothing lists the package's modules by hand. A
    function named like its module (``dkd.py`` defines ``dkd``) replaces the submodule attribute;
    two modules exporting the same name is an error.
    """
    package, skip, first = namespace["__name__"], set(skip), list(first)
    names = sorted(m.name for m in pkgutil.iter_modules(namespace["__path__"]) if m.name not in skip)
    names = [n for n in first if n in names] + [n for n in names if n not in first]
    exported = []
    for name in names:
        module = importlib.import_module(f"{package}.{name}")
        for export in module.__all__:
            value = getattr(module, export)
            current = namespace.get(export, value)
            if current is not value and not isinstance(current, types.ModuleType):
                raise ImportError(f"{package}.{name} exports {export!r}, which another module exports too")
            namespace[export] = value
            exported.append(export)
    return exported


def renamed_attributes(namespace: MutableMapping[str, Any], renamed: Mapping[str, str]):
    """A module ``__getattr__`` under which each former name in ``renamed`` (old -> new) still resolves to
    the renamed object, with one ``FutureWarning`` naming the new name."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        new = renamed.get(name)
        if new is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        warnings.warn(f"{package}.{name} is deprecated: use {package}.{new}", FutureWarning, stacklevel=2)
        return namespace[new]

    return __getattr__
