"""Metadata store backends as the contract suite sees them: a URL to open (any number of times:
reopen, a second process), and raw SQL to damage or inspect what the store holds behind its
back.  ``sqlite`` runs everywhere; ``postgresql`` runs against the throwaway cluster that
tests/support/postgres.py starts (one fresh database per test)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinblock.metadata import open_store
from thinblock.metadata.store import MetadataStore


@dataclass
class StoreBackend:
    kind: str
    url: str

    def open(self, *, create: bool = True) -> MetadataStore:
        return open_store(self.url, create=create)

    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement outside the store (``?`` placeholders); returns its rows."""
        if self.kind == "sqlite":
            db = sqlite3.connect(Path(self.url[len("sqlite:") :]) / "thinblock.db", isolation_level=None)
            try:
                return db.execute(statement, args).fetchall()
            finally:
                db.close()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement.replace("?", "%s"), args)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []
