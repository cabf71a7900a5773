"""Package plumbing: export every public name of a package's modules from the package itself, and keep
former names resolving (with a warning) after a rename."""

from __future__ import annotations

import importlib
import pkgutil
import types
import warnings
from typing import Any, Iterable, Mapping, MutableMapping


def export_modules(
    namespace: MutableMapping[str, Any], *, skip: Iterable[str] = (), first: Iterable[str] = (),
    families: Iterable[str] = (),
) -> list[str]:
    """Imports every module of the package whose ``__init__`` namespace is given, and of its family
    sub-packages (``families``, in that order: ``logit/``, ``feature/`` ...), and copies the names of each
    module's ``__all__`` into it. Returns the exported names.

    Order: the package's own modules (except ``skip``), the ``first`` ones first, then alphabetically; then
    each family folder's modules, the ``first`` ones first. This is how a new loss or method is one new file
    in its family's folder: nothing lists the package's modules by hand. A function named like its module
    (``logit/dkd.py`` defines ``dkd``) is what the package exports under that name; two modules exporting
    the same name is an error.
    """
    package, skip, first = namespace["__name__"], set(skip), list(first)

    def ordered(path, prefix):
        names = sorted(m.name for m in pkgutil.iter_modules(path) if not m.ispkg and m.name not in skip)
        return [prefix + n for n in first if n in names] + [prefix + n for n in names if n not in first]

    modules = ordered(namespace["__path__"], "")
    for family in families:
        sub = importlib.import_module(f"{package}.{family}")
        modules += ordered(sub.__path__, f"{family}.")
    exported = []
    for name in modules:
        module = importlib.import_module(f"{package}.{name}")
        for export in module.__all__:
            value = getattr(module, export)
            current = namespace.get(export, value)
            if current is not value and not isinstance(current, types.ModuleType):
                raise ImportError(f"{package}.{name} exports {export!r}, which another module exports too")
            namespace[export] = value
            exported.append(export)
    return exported


def renamed_attributes(namespace: MutableMapping[str, Any], renamed: Mapping[str, str],
                       moved: Mapping[str, str] = {}):  # noqa: B006 - read only
    """A module ``__getattr__`` under which each former name in ``renamed`` (old -> new) still resolves to
    the renamed object, and each name in ``moved`` (name -> the module it lives in now) to the moved one, with
    one ``FutureWarning`` naming where it is now."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        new = renamed.get(name)
        if new is not None:
            warnings.warn(f"{package}.{name} is deprecated: use {package}.{new}", FutureWarning, stacklevel=2)
            return namespace[new]
        home = moved.get(name)
        if home is not None:
            warnings.warn(f"{package}.{name} moved: use {home}.{name}", FutureWarning, stacklevel=2)
            return getattr(importlib.import_module(home), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
