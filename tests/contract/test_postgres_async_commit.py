"""PostgreSQL's asynchronous commits and the barrier that makes them durable
(metadata/pgsession.py): assignments and unassignments commit with ``synchronous_commit = off``,
``sync()`` (every flush) is a synchronous commit, and what a lost session may have lost is
re-applied, in order and checked against the lease, before anything else runs on a new one.

The server really loses them: these tests stop their own cluster with ``pg_ctl -m immediate``,
its WAL writer frozen first (otherwise it may write the WAL of an asynchronous commit within
microseconds, and whether the stop loses it is luck), and count the rows it kept before the
store re-applies anything."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

import psycopg
import pytest

from tests.support.postgres import LOSES_ASYNC_COMMITS, PostgresCluster, fresh_database, throwaway_cluster
from thinblock.errors import LeaseLost, MetadataUnavailable
from thinblock.metadata import open_store
from thinblock.metadata.check import check_store
from thinblock.metadata.postgres import PostgresStore
from thinblock.metadata.store import LDRow, PoolRow, VVRow

MiB = 1 << 20


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    with throwaway_cluster(LOSES_ASYNC_COMMITS) as own:
        yield own


def _open(url: str) -> PostgresStore:
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    return store


def _populate(store: PostgresStore) -> tuple[int, int]:
    """A pool, one LD of 4096 regions, one VV (synchronous commits): (LD, VV) ids."""
    pd_a = store.add_pd("/dev/a", 1 << 40, 1 << 30)
    pd_b = store.add_pd("/dev/b", 1 << 40, 1 << 30)
    pool = store.add_pool(PoolRow(0, "p", 1, 2, 4096, MiB, 64 * MiB, None, None))
    ld = store.add_ld(LDRow(0, pool, 1, 2, 4096, MiB, 4096, {(0, 0): (pd_a, 0), (0, 1): (pd_b, 0)}))
    vv = store.add_vv(VVRow(0, "v", pool, 1 << 40, None, None, None, None, "writethrough", 1.0))
    return ld, vv


def _raw(url: str, statement: str) -> list[tuple[Any, ...]]:
    """What the server holds, asked on a connection of its own (nothing re-applied)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(statement).fetchall()  # type: ignore[arg-type]


def _map(url: str) -> list[tuple[int, int, int, int]]:
    return [
        (int(a), int(b), int(c), int(d))
        for a, b, c, d in _raw(url, "SELECT vv_id, vv_region, ld_id, ld_region FROM vv_map ORDER BY 1, 2")
    ]


def _crash(cluster: PostgresCluster) -> None:
    cluster.crash()


def test_assignments_commit_asynchronously_until_a_barrier(cluster: PostgresCluster) -> None:
    with fresh_database(cluster) as url, closing(_open(url)) as store:
        ld, vv = _populate(store)
        assert store.unsynced == 0  # synchronous commits leave nothing to re-apply
        store.assign_many([(vv, 0, ld, 0), (vv, 1, ld, 1)])
        store.unassign(vv, [1])
        assert store.unsynced == 2
        # Committed: visible to any other session at once.
        assert _map(url) == [(vv, 0, ld, 0)]
        store.sync()
        assert store.unsynced == 0
        store.assign_many([(vv, 2, ld, 2)])
        store.rename_vv(vv, "w")  # a synchronous commit on the session covers it too
        assert store.unsynced == 0


def test_the_list_is_bounded_by_a_synchronous_commit(cluster: PostgresCluster) -> None:
    """A client that never flushes: every ``max_unsynced`` groups one commits synchronously."""
    with fresh_database(cluster) as url, closing(_open(url)) as store:
        ld, vv = _populate(store)
        store._session.max_unsynced = 3
        cluster.freeze_wal_writer()
        sizes = []
        for r in range(5):
            store.assign_many([(vv, r, ld, r)])
            sizes.append(store.unsynced)
        assert sizes == [1, 2, 3, 0, 1]
        store._session.unsynced.clear()  # as if the process died with the server
        _crash(cluster)
        assert _map(url) == [(vv, r, ld, r) for r in range(4)]  # the fourth was synchronous


def test_writes_made_on_the_event_loop_do_not_wait_for_the_session(cluster: PostgresCluster) -> None:
    """A PD failure's record and the pair's mirror marks are written on the loop: behind a long
    transaction of the writer's thread (a snapshot's map copy) they would stall every volume."""
    with fresh_database(cluster) as url, closing(_open(url)) as store:
        _populate(store)
        with store._session._lock:  # the writer's thread inside a long transaction
            store.set_pd_health(1, "failed")
            store.set_meta("mirror_valid", "0")
        assert [p.health for p in store.load_pds()] == ["failed", "normal"]
        assert store.get_meta("mirror_valid") == "0"


def test_an_immediate_stop_loses_async_commits_and_the_barrier_reapplies_them(
    cluster: PostgresCluster,
) -> None:
    with fresh_database(cluster) as url:
        with closing(_open(url)) as store:
            ld, vv = _populate(store)
            cluster.freeze_wal_writer()
            lease = store.acquire_lease("node:a", "a", 60)
            assert lease is not None
            store.bind_lease(lease)
            store.assign_many([(vv, r, ld, r) for r in range(0, 8)])
            store.sync()  # the first eight durable
            for first in range(8, 64, 8):  # seven groups, then a trim of two regions
                store.assign_many([(vv, r, ld, r) for r in range(first, first + 8)])
            assert store.unassign(vv, [0, 9]) == 2
            expected = [(vv, r, ld, r) for r in range(64) if r not in (0, 9)]
            assert _map(url) == expected
            _crash(cluster)
            # The server lost them (the test would prove nothing otherwise): it kept the eight
            # made durable, not one of the asynchronous commits after them.
            assert _map(url) == [(vv, r, ld, r) for r in range(8)]
            store.sync()  # a new session: the list re-applied, in order, then durable
            assert store.unsynced == 0
            assert _map(url) == expected
            assert check_store(store) == []
            assert store.region_counters() == ({vv: 62}, {ld: 62})
            assert store.map_rows_by_epoch() == {lease.epoch: 62}
            # The re-applied transaction was itself synchronous: another crash keeps it.
            _crash(cluster)
            assert _map(url) == expected
        again = _open(url)
        try:
            assert check_store(again) == []
        finally:
            again.close()


def test_the_first_write_on_a_new_session_reapplies_before_it_runs(cluster: PostgresCluster) -> None:
    """No barrier needed: a trim the crash lost is re-applied before the region is assigned
    again, so the store never holds it twice."""
    with fresh_database(cluster) as url, closing(_open(url)) as store:
        ld, vv = _populate(store)
        cluster.freeze_wal_writer()
        store.assign_many([(vv, 0, ld, 0)])
        store.sync()
        store.unassign(vv, [0])
        _crash(cluster)
        assert _map(url) == [(vv, 0, ld, 0)], "the crash kept the trim"
        store.assign_many([(vv, 1, ld, 0)])  # LD region 0 again, for another VV region
        assert _map(url) == [(vv, 1, ld, 0)]
        assert check_store(store) == []


def test_reapplied_writes_are_checked_against_the_lease(cluster: PostgresCluster) -> None:
    with fresh_database(cluster) as url:
        store = _open(url)
        other = None
        try:
            ld, vv = _populate(store)
            cluster.freeze_wal_writer()
            lease = store.acquire_lease("node:a", "a", 60)
            assert lease is not None
            store.bind_lease(lease)
            store.assign_many([(vv, r, ld, r) for r in range(8)])
            _crash(cluster)
            assert _map(url) == [], "the crash kept the assignments"
            store.release_lease(lease)  # as if it expired
            other = _open(url)
            theirs = other.acquire_lease("node:a", "b", 60)
            assert theirs is not None and theirs.epoch == lease.epoch + 1
            with pytest.raises(LeaseLost):
                store.sync()
            with pytest.raises(LeaseLost):
                store.assign_many([(vv, 100, ld, 100)])
            assert _map(url) == []
            assert store.unsynced > 0  # kept: a flush on this store never succeeds again
        finally:
            store.bind_lease(None)
            store._session.unsynced.clear()  # nothing to make durable at close
            store.close()
            if other is not None:
                other.close()


def test_an_assignment_refused_for_the_lease_is_never_reapplied(cluster: PostgresCluster) -> None:
    """Its caller was told it failed (and gave the regions back): re-applied once the same
    holder took the lease again (same epoch), it would assign them behind its back."""
    with fresh_database(cluster) as url, closing(_open(url)) as store:
        ld, vv = _populate(store)
        lease = store.acquire_lease("node:a", "a", 60)
        assert lease is not None
        store.bind_lease(lease)
        store.release_lease(lease)  # expired, nobody else took it
        with pytest.raises(LeaseLost):
            store.assign_many([(vv, 0, ld, 0)])
        assert store.unsynced == 0
        again = store.acquire_lease("node:a", "a", 60)
        assert again is not None and again.epoch == lease.epoch
        store.bind_lease(again)
        store.assign_many([(vv, 1, ld, 1)])
        store._session.close()  # a lost session: the next write re-applies the list
        store.assign_many([(vv, 2, ld, 2)])
        assert _map(url) == [(vv, 1, ld, 1), (vv, 2, ld, 2)]
        assert check_store(store) == []


def test_a_barrier_the_server_cannot_take_fails_and_keeps_the_list(cluster: PostgresCluster) -> None:
    with fresh_database(cluster) as url, closing(_open(url)) as store:
        ld, vv = _populate(store)
        store.assign_many([(vv, r, ld, r) for r in range(4)])
        cluster.stop("immediate")
        try:
            with pytest.raises(MetadataUnavailable):
                store.sync()
            assert store.unsynced == 1
        finally:
            cluster.start()
        store.sync()
        assert _map(url) == [(vv, r, ld, r) for r in range(4)]
        assert check_store(store) == []


class _AnswerLost(psycopg.Connection[Any]):
    """A connection whose next pipelined transaction commits and then loses its answer (the
    connection closed before the client hears of the commit)."""

    lose_next = False
    depth = 0  # psycopg nests pipelines (a transaction inside one opens its own): the outermost

    def pipeline(self) -> Any:
        real = super().pipeline()
        conn = self

        class Losing:
            def __enter__(self) -> Any:
                conn.depth += 1
                return real.__enter__()

            def __exit__(self, *exc: Any) -> Any:
                conn.depth -= 1
                result = real.__exit__(*exc)
                if exc[0] is None and conn.depth == 0 and type(conn).lose_next:
                    type(conn).lose_next = False
                    conn.close()
                    raise psycopg.OperationalError("the server's answer was lost (the test)")
                return result

        return Losing()


def test_an_assignment_whose_commit_answer_was_lost_is_undone_first(cluster: PostgresCluster) -> None:
    with fresh_database(cluster) as url, closing(_open(url)) as store:
        ld, vv = _populate(store)
        store._session._connect = lambda: _AnswerLost.connect(url, autocommit=True)
        store._session.close()  # the next transaction opens a losing connection
        _AnswerLost.lose_next = True
        with pytest.raises(MetadataUnavailable):
            store.assign_many([(vv, 0, ld, 0), (vv, 1, ld, 1)])
        # The commit happened; its caller was told it failed and gave the regions back.
        assert _map(url) == [(vv, 0, ld, 0), (vv, 1, ld, 1)]
        store.assign_many([(vv, 5, ld, 0)])  # LD region 0 again: undone first
        assert _map(url) == [(vv, 5, ld, 0)]
        assert store._session.restored == 2
        assert check_store(store) == []
        assert store.region_counters() == ({vv: 1}, {ld: 1})
