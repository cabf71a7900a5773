"""Package plumbing: export every public name of a package's modules from the package itself."""

from __future__ import annotations

import importlib
import pkgutil
import types
from typing import Any, Iterable, MutableMapping


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
