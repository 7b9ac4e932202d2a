"""Fixtures shared by every suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PostgresCluster, fresh_database, throwaway_cluster
from tests.support.stores import StoreBackend


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the whole session (one per xdist worker)."""
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgresql_backend(postgres_cluster: PostgresCluster) -> Iterator[StoreBackend]:
    """An empty PostgreSQL store (a fresh database of the session's cluster), for what only
    PostgreSQL has: a test of it is not parametrized over SQLite to be skipped there (a skipped
    test reads as passed)."""
    with fresh_database(postgres_cluster) as url:
        yield StoreBackend("postgresql", url)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    """Every metadata store backend, each test with an empty store of its own: SQLite in a
    directory of its own, or a fresh database of the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        (tmp_path / "store").mkdir()
        yield StoreBackend("sqlite", f"sqlite:{tmp_path / 'store'}")
        return
    cluster = request.getfixturevalue("postgres_cluster")
    with fresh_database(cluster) as url:
        yield StoreBackend("postgresql", url)
