"""thinblock.metadata: the store contract (``store.py``), its backends (``sqlite.py``,
``postgres.py``), the backend-independent check (``check.py``) and the writer the engine
changes its store through while serving (``writer.py``).

``open_store(url, data_dir)`` picks a backend from a URL:

* ``sqlite:`` (the default) -- ``thinblock.db`` in the data directory;
  ``sqlite:DIR`` -- the one in DIR;
* ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB`` (or ``postgres://``), any libpq URL.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InvalidArgument
from .store import MetadataStore

DEFAULT_URL = "sqlite:"


def redact_url(url: str) -> str:
    """The URL without its password (``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``),
    and without a ``password=`` query parameter's value: for messages and logs."""
    url = re.sub(r"^([a-z]+://[^:/@]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"(password=)[^&]*", r"\1***", url)


def store_kind(url: str | None) -> str:
    """``sqlite`` or ``postgresql``; InvalidArgument for anything else."""
    url = url or DEFAULT_URL
    if url.startswith("sqlite:"):
        return "sqlite"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql"
    raise InvalidArgument(
        f"metadata store URL {redact_url(url)!r}: expected sqlite: (the data directory),"
        " sqlite:DIR or postgresql://USER@HOST/DB"
    )


def sqlite_dir(url: str | None, data_dir: str | Path | None) -> Path:
    url = url or DEFAULT_URL
    rest = url[len("sqlite:") :]
    if rest.startswith("//"):
        rest = rest[2:]
    if rest:
        return Path(rest)
    if data_dir is None:
        raise InvalidArgument("sqlite: names the data directory's store, and no data directory was given")
    return Path(data_dir)


def open_store(url: str | None, data_dir: str | Path | None = None, *, create: bool = True) -> MetadataStore:
    """The store named by ``url`` (None: SQLite in ``data_dir``).  ``create`` False: a store that
    does not exist yet is an error (``thinblock check``), not a new empty one."""
    kind = store_kind(url)
    if kind == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(sqlite_dir(url, data_dir), create=create)
    from .postgres import PostgresStore

    assert url is not None
    return PostgresStore(url, create=create)
