"""``stdlib_corpus``: a TFDS text data set of the Python standard library's own source files.

The language-model distillation experiments need text that every machine has and that nothing has to
download: the ``.py`` files of the running interpreter's standard library, found at run time through
``sysconfig.get_paths()["stdlib"]`` (about 1 800 files and 30 MB for CPython 3.11).  The builder is a
``tfds.core.GeneratorBasedBuilder`` meant to be prepared with ``file_format="array_record"`` and read
with ``builder.as_data_source(split)``: no TensorFlow, no network (:func:`stdlib_corpus_texts` does
both; :func:`stdlib_corpus_sequences` also tokenizes and packs the split).

Files (:func:`find_source_files`)
    Every regular file ending in ``.py`` under the source folder, walked without following directory
    links, except:

    * directories named ``site-packages`` or ``dist-packages`` (third-party code, not the stdlib),
      ``__pycache__`` (bytecode), directories whose name starts with ``.`` and, at any depth,
      directories whose name starts with ``config-`` (CPython's ``config-3.X-<platform>`` build folder:
      install-specific, not library code);
    * files named ``_sysconfigdata_*.py`` (generated at install time; they hold the build machine's
      paths and flags, so they differ between installs of the same version);
    * files larger than ``max_file_bytes`` (default :data:`MAX_FILE_BYTES`, 512 KiB) are **skipped, not
      truncated** (cutting a module mid-statement would teach the model broken code), with a logged
      warning naming them.  With the
      default this drops only ``pydoc_data/topics.py`` in CPython 3.11 (757 KB of generated help text
      in one dict literal).  ``max_file_bytes=None`` keeps every file.

    The tests (``test/``, ``idlelib/idle_test/``, ...) are kept: they are ordinary Python code and about
    half of the corpus.  The text is stored as raw bytes, whatever its encoding (a few test files are
    deliberately not UTF-8).

Splits (:func:`split_of`, fixed and documented)
    A file's split depends only on its path relative to the source folder (POSIX separators, UTF-8):
    ``h = int.from_bytes(sha256(path).digest()[:8], "big") % 100``; ``h < 90``: ``train``, ``h < 95``:
    ``validation``, else ``test``.  So the splits are disjoint by file and a file keeps its split when
    others are added or removed (across Python versions too).  A split that no file falls in (tiny
    folders) is not written.

Features
    ``text``: the file's bytes (``tfds.features.Text``, read back as ``bytes``); ``path``: its relative
    path (read back as UTF-8 ``bytes``; :func:`stdlib_corpus_sequences` decodes it).  Each example's
    key is its path.

Configs
    The standard library differs between Python versions, so the default config is named after the
    running interpreter's full version (``py3_11_7``) and records it in ``config.python_version``.
    ``StdlibCorpus(source_dir=..., max_file_bytes=...)`` makes a custom config instead, named
    ``custom_<16 hex>`` after a sha256 of the folder's absolute path, ``max_file_bytes`` and the
    listing of its ``.py`` files (relative path, size, modification time): preparing a changed folder
    writes a new config instead of reading a stale one.  (The default config is not fingerprinted:
    an interpreter's stdlib does not change under a fixed version.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import sysconfig

import tensorflow_datasets as tfds

from jaxkd.batch import MASK, TOKENS
from jaxkd.checks import check_int
from jaxkd.data.local_builder import LocalBuilder
from jaxkd.data.text.bits_per_byte import count_byte_targets
from jaxkd.data.text.packing import PackedText, pack_documents
from jaxkd.data.text.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "EXCLUDED_DIRS",
    "MAX_FILE_BYTES",
    "SPLIT_PERCENT",
    "StdlibCorpus",
    "StdlibCorpusConfig",
    "default_source_dir",
    "find_source_files",
    "split_of",
    "stdlib_corpus_sequences",
    "stdlib_corpus_texts",
]

log = logging.getLogger("jaxkd.data.text.stdlib_corpus")

#: Files larger than this are skipped (not truncated) by default.
MAX_FILE_BYTES = 512 * 1024
#: Directory names never descended into (see the module docstring; also ``.*`` and ``config-*``).
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
#: ``(train, validation, test)`` percentages of the hash split.
SPLIT_PERCENT = (90, 5, 5)

_DESCRIPTION = """\
The .py source files of the Python standard library of the interpreter that prepared the data set
(sysconfig.get_paths()["stdlib"]; nothing is downloaded), or of a given folder. Excluded:
site-packages, dist-packages, __pycache__, hidden and config-* directories, _sysconfigdata_*.py files,
and files larger than max_file_bytes (skipped, not truncated). Split by file: h = first 8 bytes of
sha256(relative POSIX path) mod 100; h < 90 train, h < 95 validation, else test. Features: text (the
file's bytes) and path (relative path). The Python source is under the PSF License.
"""


def default_source_dir() -> str:
    """The running interpreter's standard library folder, ``sysconfig.get_paths()["stdlib"]``."""
    return sysconfig.get_paths()["stdlib"]


def split_of(relative_path: str) -> str:
    """``"train"``, ``"validation"`` or ``"test"``: the fixed split of a file (see the module docstring)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    h = int.from_bytes(digest[:8], "big") % 100
    train, validation, _ = SPLIT_PERCENT
    if h < train:
        return "train"
    if h < train + validation:
        return "validation"
    return "test"


def _path_order_key(relative_path: str) -> bytes:
    """A stable pseudo-random order of files (their sha256): what ``max_files`` takes a prefix of."""
    return hashlib.sha256(relative_path.encode("utf-8")).digest()


def _excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith(".") or name.startswith("config-")


def find_source_files(
    source_dir: str | os.PathLike | None = None, *, max_file_bytes: int | None = MAX_FILE_BYTES
) -> list[tuple[str, int]]:
    """The corpus files of ``source_dir``: ``(relative POSIX path, size in bytes)``, sorted by path.

    See the module docstring for what is excluded.  ``source_dir=None``: :func:`default_source_dir`.

    Raises:
        ValueError: ``source_dir`` is not a folder, or has no ``.py`` file to keep (the message names it).
    """
    if max_file_bytes is not None:
        check_int("max_file_bytes", max_file_bytes, low=1)
    root = os.path.abspath(default_source_dir() if source_dir is None else os.fspath(source_dir))
    if not os.path.isdir(root):
        raise ValueError(f"source_dir must be a folder of .py files, got {root!r} (not a folder)")
    found: list[tuple[str, int]] = []
    too_big: list[tuple[str, int]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _excluded_dir(d))
        for name in files:
            if not name.endswith(".py") or name.startswith("_sysconfigdata_"):
                continue
            full = os.path.join(folder, name)
            if not os.path.isfile(full):
                continue  # a broken link or not a regular file
            size = os.path.getsize(full)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if max_file_bytes is not None and size > max_file_bytes:
                too_big.append((rel, size))
                continue
            found.append((rel, size))
    if too_big:
        # A file the user put in the corpus and the model never sees must not vanish unannounced.
        listing = ", ".join(f"{rel} ({size} bytes)" for rel, size in sorted(too_big))
        log.warning("stdlib_corpus: skipped %d file(s) of %s over max_file_bytes=%d (pass a larger "
                    "max_file_bytes, or None, to keep them): %s", len(too_big), root, max_file_bytes, listing)
    if not found:
        raise ValueError(
            f"source_dir {root!r} has no .py files to build stdlib_corpus from (after excluding"
            f" {', '.join(EXCLUDED_DIRS)}, hidden and config-* folders, _sysconfigdata_*.py and"
            f" files over max_file_bytes={max_file_bytes})"
        )
    found.sort()
    return found


def _default_config_name() -> str:
    return "py" + platform.python_version().replace(".", "_").replace("+", "plus")


@dataclasses.dataclass(eq=False)
class StdlibCorpusConfig(tfds.core.BuilderConfig):
    """A ``stdlib_corpus`` config: where the files come from and how large a file may be.

    Attributes:
        source_dir: the folder walked (None: the running interpreter's stdlib).
        max_file_bytes: files larger than this are skipped (None: none).
        python_version: the interpreter version of the default config (``""`` for a custom folder).
    """

    source_dir: str | None = None
    max_file_bytes: int | None = MAX_FILE_BYTES
    python_version: str = ""


def _custom_config(source_dir, max_file_bytes) -> StdlibCorpusConfig:
    root = os.path.abspath(default_source_dir() if source_dir is None else os.fspath(source_dir))
    listing = []
    for rel, size in find_source_files(root, max_file_bytes=max_file_bytes):
        mtime = os.stat(os.path.join(root, rel)).st_mtime_ns
        listing.append([rel, size, mtime])
    fingerprint = hashlib.sha256(
        json.dumps({"root": root, "max_file_bytes": max_file_bytes, "files": listing}).encode()
    ).hexdigest()[:16]
    return StdlibCorpusConfig(
        name=f"custom_{fingerprint}",
        description=f".py files of {root} (max_file_bytes={max_file_bytes})",
        source_dir=root,
        max_file_bytes=max_file_bytes,
    )


class StdlibCorpus(LocalBuilder):
    """The Python standard library's ``.py`` files as a text data set (see the module docstring).

    Args:
        source_dir: a folder to read instead of the running interpreter's stdlib (a custom config).
        max_file_bytes: the largest file kept (a custom config when not :data:`MAX_FILE_BYTES`).
        config: a :class:`StdlibCorpusConfig` or config name (then ``source_dir``/``max_file_bytes``
            must be left at their defaults).
        **kwargs: ``data_dir``, ``version``, as for any TFDS builder.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        StdlibCorpusConfig(
            name=_default_config_name(),
            description=f"The standard library of Python {platform.python_version()}.",
            python_version=platform.python_version(),
        )
    ]

    def __init__(
        self,
        *,
        source_dir: str | os.PathLike | None = None,
        max_file_bytes: int | None = MAX_FILE_BYTES,
        config: str | StdlibCorpusConfig | None = None,
        **kwargs,
    ):
        custom = source_dir is not None or max_file_bytes != MAX_FILE_BYTES
        if custom:
            if config is not None:
                raise ValueError(
                    "pass either config or source_dir/max_file_bytes, not both (they make a config)"
                )
            config = _custom_config(source_dir, max_file_bytes)
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            homepage="https://docs.python.org/3/library/",
            metadata=tfds.core.MetadataDict(
                python_version=self.builder_config.python_version,
                max_file_bytes=self.builder_config.max_file_bytes,
                split_percent=list(SPLIT_PERCENT),
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded: the files are on this machine.
        config = self.builder_config
        root = os.path.abspath(config.source_dir or default_source_dir())
        by_split: dict[str, list[str]] = {}
        for rel, _ in find_source_files(root, max_file_bytes=config.max_file_bytes):
            by_split.setdefault(split_of(rel), []).append(rel)
        # An empty split is not written (TFDS refuses to write one); reading it raises.
        return {name: self._generate_examples(root, paths) for name, paths in by_split.items()}

    def _generate_examples(self, root, paths):
        for rel in paths:
            with open(os.path.join(root, rel), "rb") as f:
                yield rel, {"text": f.read(), "path": rel}


def _check_can_create(data_dir: str) -> None:
    """``ValueError`` naming ``data_dir`` unless it is, or can be created as, a folder.

    Checks without creating anything (the nearest existing ancestor must be a writable folder).
    """
    path = os.path.abspath(data_dir)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"data_dir must be a writable directory to prepare 'stdlib_corpus' on first use, got"
            f" data_dir={data_dir!r} ({probe!r} is not a writable folder). Point data_dir at a"
            " writable directory, or at one where it is already prepared."
        )


def stdlib_corpus_texts(
    split: str,
    *,
    data_dir: str | os.PathLike | None,
    source_dir: str | os.PathLike | None = None,
    max_files: int | None = None,
    max_file_bytes: int | None = MAX_FILE_BYTES,
) -> list[tuple[str, bytes]]:
    """The files of a split of ``stdlib_corpus`` as ``(relative path, bytes)``, in a fixed order.

    Prepares the builder into ``data_dir`` on first use (array_record, offline) and reads the split
    through ``as_data_source``.  The files are ordered by the sha256 of their path: a stable
    pseudo-random order, so that the first ``max_files`` are spread over the whole library and a larger
    ``max_files`` only appends files.  (E.g. the texts to learn a BPE from,
    :func:`jaxkd.data.text.bpe.train_bpe`.)

    Args:
        split: a TFDS split (``"train"``, ``"validation"``, ``"test"``, ``"train[:10%]"``...).
        data_dir: TFDS data directory (None: TFDS's default).
        source_dir, max_file_bytes: see :class:`StdlibCorpus` (a custom folder or size cap).
        max_files: keep the first ``max_files`` files of that order (None: all).

    Raises:
        ValueError: a bad argument, a source folder without ``.py`` files, an empty split, or a
            ``data_dir`` where the data set can be neither found nor prepared.
    """
    if max_files is not None:
        check_int("max_files", max_files, low=1)
    data_dir = None if data_dir is None else os.fspath(data_dir)
    builder = StdlibCorpus(data_dir=data_dir, source_dir=source_dir, max_file_bytes=max_file_bytes)
    if not builder.is_prepared():
        _check_can_create(os.fspath(builder.data_dir_root))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            file_format="array_record",
        )
    try:
        source = builder.as_data_source(split=split)
    except ValueError as e:
        base = split.split("[", 1)[0]
        if base in builder.info.splits or base not in ("train", "validation", "test"):
            raise
        # Not written because no file hashes into it (a small source folder).
        where = builder.builder_config.source_dir or default_source_dir()
        raise ValueError(
            f"split {split!r}: no file of {where!r} falls in split {base!r} (it has"
            f" {sorted(builder.info.splits)}); splits are drawn by file path, see"
            " jaxkd.data.text.stdlib_corpus.split_of"
        ) from e
    records = []
    for i in range(len(source)):
        record = source[i]
        path = record["path"]
        path = path.decode("utf-8") if isinstance(path, bytes) else str(path)
        text = record["text"]
        text = text if isinstance(text, bytes) else str(text).encode("utf-8")
        records.append((_path_order_key(path), path, text))
    if not records:
        raise ValueError(f"split {split!r} of stdlib_corpus is empty")
    records.sort()
    if max_files is not None:
        records = records[:max_files]
    return [(path, text) for _, path, text in records]


def stdlib_corpus_sequences(
    split: str,
    *,
    seq_len: int,
    data_dir: str | os.PathLike | None,
    source_dir: str | os.PathLike | None = None,
    max_files: int | None = None,
    max_file_bytes: int | None = MAX_FILE_BYTES,
    tokenizer: Tokenizer | None = None,
) -> PackedText:
    """A split of ``stdlib_corpus``, tokenized and packed into rows of ``seq_len`` tokens.

    The files of :func:`stdlib_corpus_texts` (prepared on first use, read through
    ``as_data_source``, in the order of the sha256 of their path, the first ``max_files``), each
    tokenized and packed with :func:`jaxkd.data.pack_documents` (``BOS`` file ``EOS``, ...).

    Args:
        split: a TFDS split (``"train"``, ``"validation"``, ``"test"``, ``"train[:10%]"``...).
        seq_len: tokens per row, ``>= 2``.
        data_dir: TFDS data directory (None: TFDS's default).
        source_dir, max_file_bytes: see :class:`StdlibCorpus` (a custom folder or size cap).
        max_files: keep the first ``max_files`` files of that order (None: all).
        tokenizer: a :class:`jaxkd.data.Tokenizer` (default :class:`ByteTokenizer`).

    Returns:
        A :class:`jaxkd.data.PackedText`: ``tokens``/``mask`` ``[N, seq_len]``,
        ``num_byte_targets`` (the bits-per-byte denominator of the whole split), ``paths``.

    Raises:
        ValueError: as :func:`stdlib_corpus_texts`, or ``seq_len < 2``, or a tokenizer without the
            :class:`jaxkd.data.Tokenizer` interface.
    """
    check_int("seq_len", seq_len, low=2)
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(
            f"tokenizer must have encode/decode, special ids and token_byte_lengths, got {tokenizer!r}"
        )
    files = stdlib_corpus_texts(
        split, data_dir=data_dir, source_dir=source_dir, max_files=max_files,
        max_file_bytes=max_file_bytes,
    )
    docs = [tokenizer.encode(text) for _, text in files]
    packed = pack_documents(
        docs, seq_len, bos=tokenizer.bos_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id
    )
    return PackedText(
        tokens=packed[TOKENS],
        mask=packed[MASK],
        num_byte_targets=count_byte_targets(
            packed[TOKENS], packed[MASK], tokenizer.token_byte_lengths
        ),
        num_documents=len(files),
        num_text_bytes=int(sum(len(text) for _, text in files)),
        paths=tuple(path for path, _ in files),
    )
