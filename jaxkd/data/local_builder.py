"""The base of jaxkd's TFDS builders (the digits images, the standard-library corpus): data sets prepared from
what is already on this machine, so nothing is ever downloaded."""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds
from etils import epath

__all__ = ["LocalBuilder"]


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A ``GeneratorBasedBuilder`` whose examples come from local files or installed packages."""

    # tfds 4.9.10's default ``code_path`` imports the ``importlib_resources`` backport, which tfds only declares
    # as a dependency for Python < 3.9; the path only serves to look for a ``checksums.tsv`` beside the
    # builder's module (there is none: nothing is downloaded), so point it at that module directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(sys.modules[cls.__module__].__file__)
