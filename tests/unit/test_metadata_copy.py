"""``thinblock metadata copy``: a stopped node's SQLite store into an empty store of either
backend, checked before and after; each refusal one line, nothing written.  (With a real
daemon and real clients before and after the copy: tests/e2e/test_metadata_copy.py.)"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import pytest

from tests.support.stores import StoreBackend
from thinblock.cli import EXIT_ERROR, EXIT_OK, main
from thinblock.datalock import lock_data_dir
from thinblock.metadata import open_store
from thinblock.metadata.check import check_store
from thinblock.metadata.store import LDRow, PoolRow, VVRow

MiB = 1 << 20


def _node_store(data_dir: Path) -> dict[str, int]:
    """A data directory's SQLite store with a pool, an LD, two VVs, a map and an alert; its counts."""
    data_dir.mkdir()
    store = open_store(f"sqlite:{data_dir}")
    try:
        pd_a = store.add_pd(str(data_dir / "a"), 64 * MiB, 16 * MiB)
        pd_b = store.add_pd(str(data_dir / "b"), 64 * MiB, 16 * MiB)
        pool = store.add_pool(PoolRow(0, "default", 1, 2, 4096, MiB, 32 * MiB, None, None))
        ld = store.add_ld(LDRow(0, pool, 1, 2, 4096, MiB, 16, {(0, 0): (pd_a, 0), (0, 1): (pd_b, 0)}))
        vvs = [
            store.add_vv(VVRow(0, name, pool, 64 * MiB, None, None, None, None, "writethrough", 1.0))
            for name in ("vol0", "vol1")
        ]
        store.assign_many([(vvs[0], 0, ld, 3), (vvs[1], 7, ld, 4), (vvs[1], 8, ld, 5)])
        store.add_alert(1.0, "info", "ld-created", f"ld:{ld}", "made", "new")
        store.set_meta("data_dir_id", "d1")
        store.set_meta("generation", "4")
        store.set_meta("clean", "1")
        assert check_store(store) == []
        return store.counts()
    finally:
        store.close()


def _copy(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["metadata", "copy", *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: metadata copy: "), err
    return lines[0]


def test_a_node_store_copies_into_an_empty_store_checked_on_both_sides(
    tmp_path: Path, backend: StoreBackend
) -> None:
    counts = _node_store(tmp_path / "node")
    code, out, err = _copy("--from", f"sqlite:{tmp_path / 'node'}", "--to", backend.url)
    assert (code, err) == (EXIT_OK, ""), err
    assert "checked ok on both sides" in out and "vv_map: 3" in out and "--metadata" in out
    target = backend.open(create=False)
    try:
        assert check_store(target) == [] and target.counts() == counts
        assert [v.name for v in target.load_vvs()] == ["vol0", "vol1"]
        assert (target.get_meta("data_dir_id"), target.get_meta("generation")) == ("d1", "4")
    finally:
        target.close()


def test_a_target_that_is_not_empty_is_refused_and_left_alone(tmp_path: Path, backend: StoreBackend) -> None:
    _node_store(tmp_path / "node")
    assert _copy("--from", f"sqlite:{tmp_path / 'node'}", "--to", backend.url)[0] == EXIT_OK
    before = backend.sql("SELECT COUNT(*) FROM vv_map")
    code, _out, err = _copy("--from", f"sqlite:{tmp_path / 'node'}", "--to", backend.url)
    assert code == EXIT_ERROR
    assert (
        "is not empty (2 pds, 1 pools, 1 lds, 2 ld_chunklets, 2 vvs, 3 vv_map, 1 alerts)"
        in _one_error_line(err)
    )
    assert backend.sql("SELECT COUNT(*) FROM vv_map") == before


def test_a_data_directory_a_daemon_holds_is_refused(tmp_path: Path, backend: StoreBackend) -> None:
    _node_store(tmp_path / "node")
    fd = lock_data_dir(tmp_path / "node")  # what a running daemon holds (Engine.open)
    try:
        code, _out, err = _copy("--from", f"sqlite:{tmp_path / 'node'}", "--to", backend.url)
    finally:
        import os

        os.close(fd)
    assert code == EXIT_ERROR
    line = _one_error_line(err)
    assert "is in use by another thinblock process (pid" in line and "stop the daemon" in line, line
    target = backend.open()
    try:
        assert target.is_empty()
    finally:
        target.close()


def test_a_source_that_fails_its_check_is_refused(tmp_path: Path, backend: StoreBackend) -> None:
    _node_store(tmp_path / "node")
    db = sqlite3.connect(tmp_path / "node" / "thinblock.db", isolation_level=None)
    db.execute("UPDATE vvs SET regions = regions + 1 WHERE name='vol1'")  # a lost map row, as it looks
    db.close()
    code, _out, err = _copy("--from", f"sqlite:{tmp_path / 'node'}", "--to", backend.url)
    assert code == EXIT_ERROR
    line = _one_error_line(err)
    assert "fails its check" in line and "VV 'vol1' records 3 assigned regions but its map holds 2" in line, (
        line
    )
    target = backend.open()
    try:
        assert target.is_empty()
    finally:
        target.close()


@pytest.mark.parametrize("what", ["no directory", "no store"])
def test_a_missing_source_is_refused(tmp_path: Path, backend: StoreBackend, what: str) -> None:
    if what == "no store":
        (tmp_path / "node").mkdir()
    code, _out, err = _copy("--from", f"sqlite:{tmp_path / 'node'}", "--to", backend.url)
    assert code == EXIT_ERROR
    line = _one_error_line(err)
    assert ("no data directory at" if what == "no directory" else "no metadata store at") in line, line
    assert not (tmp_path / "node" / "thinblock.db").exists()


def test_copying_a_store_onto_itself_is_refused(tmp_path: Path) -> None:
    _node_store(tmp_path / "node")
    code, _out, err = _copy("--from", f"sqlite:{tmp_path / 'node'}", "--to", f"sqlite:{tmp_path / 'node'}/")
    assert code == EXIT_ERROR and "source and target are the same store" in _one_error_line(err)
