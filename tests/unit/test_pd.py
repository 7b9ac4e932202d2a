"""Physical disks: opening and validation, I/O, punch-hole, failure handling."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from thinblock.errors import InvalidArgument, MediumError
from thinblock.model import PDHealth
from thinblock.physical import pd as pd_module
from thinblock.physical.pd import IOV_MAX, WRITE_PIECE, PhysicalDisk
from thinblock.units import KiB, MiB

CHUNK = 64 * KiB


def open_pd(tmp_path: Path, name: str = "pd.img", size: int = 8 * CHUNK, **kw: object) -> PhysicalDisk:
    return PhysicalDisk.open(
        1, str(tmp_path / name), size=size, chunklet_size=CHUNK, create=True, allow_tiny=True, **kw
    )


# --- opening ------------------------------------------------------------------------------
def test_creates_a_sparse_file_of_the_given_size(tmp_path: Path) -> None:
    with PhysicalDisk.open(7, str(tmp_path / "a"), size=64 * MiB, chunklet_size=MiB, create=True) as pd:
        st = os.stat(pd.path)
        assert st.st_size == 64 * MiB
        assert st.st_blocks * 512 < MiB, "the new PD file must be sparse"
        assert (pd.id, pd.size, pd.chunklet_size, pd.chunklet_count) == (7, 64 * MiB, MiB, 64)
        assert pd.chunklet_offset(0) == 0 and pd.chunklet_offset(63) == 63 * MiB
        assert pd.health is PDHealth.NORMAL
        buf = bytearray(b"x" * 4096)
        pd.pread_into(5 * MiB, memoryview(buf))
        assert buf == bytes(4096)


def test_chunklet_count_rounds_down_and_offsets_are_checked(tmp_path: Path) -> None:
    with open_pd(tmp_path, size=3 * CHUNK + 100) as pd:
        assert pd.chunklet_count == 3
        with pytest.raises(InvalidArgument, match="no chunklet 3"):
            pd.chunklet_offset(3)
        with pytest.raises(InvalidArgument):
            pd.chunklet_offset(-1)


def test_existing_file_uses_its_size_or_a_smaller_one(tmp_path: Path) -> None:
    path = tmp_path / "existing"
    path.write_bytes(b"\1" * (4 * CHUNK))
    with PhysicalDisk.open(1, str(path), size=None, chunklet_size=CHUNK, create=False, allow_tiny=True) as pd:
        assert pd.size == 4 * CHUNK
        buf = bytearray(3)
        pd.pread_into(4 * CHUNK - 3, memoryview(buf))
        assert buf == b"\1\1\1"
    with PhysicalDisk.open(
        1, str(path), size=2 * CHUNK, chunklet_size=CHUNK, create=True, allow_tiny=True
    ) as pd:
        assert pd.size == 2 * CHUNK and pd.chunklet_count == 2
    assert path.stat().st_size == 4 * CHUNK, "opening an existing file must not change it"
    with pytest.raises(InvalidArgument, match="less than the size asked for"):
        PhysicalDisk.open(1, str(path), size=5 * CHUNK, chunklet_size=CHUNK, create=True, allow_tiny=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunklet_size": 3 * MiB}, "power of two"),
        ({"chunklet_size": 0}, "power of two"),
        ({"chunklet_size": 512 * KiB}, "at least 1 MiB"),
        ({"chunklet_size": 2 * KiB, "allow_tiny": True}, "at least 4 KiB"),
        ({"size": 0}, "must be positive"),
        ({"size": -5}, "must be positive"),
        ({"size": MiB // 2}, "smaller than one chunklet"),
        ({"size": None}, "give a size"),
        ({"create": False}, "does not exist"),
    ],
)
def test_bad_input_is_refused_clearly(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"size": 4 * MiB, "chunklet_size": MiB, "create": True} | kwargs
    path = tmp_path / "bad"
    with pytest.raises(InvalidArgument, match=message):
        PhysicalDisk.open(1, str(path), **args)  # type: ignore[arg-type]
    assert not path.exists(), "a refused PD leaves nothing behind"


def test_tiny_chunklets_need_allow_tiny(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="at least 1 MiB"):
        PhysicalDisk.open(1, str(tmp_path / "t"), size=MiB, chunklet_size=64 * KiB, create=True)
    with PhysicalDisk.open(
        1, str(tmp_path / "t"), size=MiB, chunklet_size=4 * KiB, create=True, allow_tiny=True
    ) as pd:
        assert pd.chunklet_count == 256


def test_directories_and_missing_parents_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="neither a regular file nor a block device"):
        PhysicalDisk.open(1, str(tmp_path), size=None, chunklet_size=MiB, create=False)
    with pytest.raises(InvalidArgument, match="cannot create"):
        PhysicalDisk.open(1, str(tmp_path / "no" / "such"), size=4 * MiB, chunklet_size=MiB, create=True)


def test_existing_file_smaller_than_a_chunklet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "small"
    path.write_bytes(bytes(1000))
    with pytest.raises(InvalidArgument, match="smaller than one chunklet"):
        PhysicalDisk.open(1, str(path), size=None, chunklet_size=4 * KiB, create=False, allow_tiny=True)


# --- I/O ----------------------------------------------------------------------------------
def test_write_read_roundtrip_any_alignment(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        data = os.urandom(10000)
        pd.pwrite(12345, data)
        buf = bytearray(10000)
        pd.pread_into(12345, memoryview(buf))
        assert buf == data
        pd.pwrite(12345 + 10, memoryview(b"abc"))
        pd.pwrite(12345 + 20, bytearray(b"def"))
        small = bytearray(30)
        pd.pread_into(12345, memoryview(small))
        assert small == data[:10] + b"abc" + data[13:20] + b"def" + data[23:30]


def test_large_writes_reach_the_kernel_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No write syscall carries more than WRITE_PIECE bytes (the page cache sizes its folios
    after the write), and the bytes land where they belong, for pwrite and pwritev alike."""
    sizes: list[int] = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        sizes.append(len(data))
        return real_pwrite(fd, data, offset)

    def pwritev(fd: int, bufs: list[bytes], offset: int) -> int:
        sizes.append(sum(len(b) for b in bufs))
        return real_pwritev(fd, bufs, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    with open_pd(tmp_path) as pd:
        big = os.urandom(WRITE_PIECE * 3 + 1000)
        pd.pwrite(4096, big)
        assert max(sizes) == WRITE_PIECE and sum(sizes) == len(big)
        sizes.clear()
        parts = [os.urandom(n) for n in (100 * KiB, 100 * KiB, 100 * KiB, WRITE_PIECE + 5, 7, 64 * KiB)]
        pd.pwritev(MiB, parts)
        assert max(sizes) <= WRITE_PIECE and sum(sizes) == sum(map(len, parts))
        back = bytearray(len(big))
        pd.pread_into(4096, memoryview(back))
        assert back == big
        back = bytearray(sum(map(len, parts)))
        pd.pread_into(MiB, memoryview(back))
        assert back == b"".join(parts)


def test_vectored_io_splits_past_iov_max(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        pieces = [os.urandom(7) for _ in range(IOV_MAX + 300)]
        pd.pwritev(999, pieces)
        bufs = [bytearray(7) for _ in pieces]
        pd.preadv(999, [memoryview(b) for b in bufs])
        assert bufs == pieces
        whole = bytearray(7 * len(pieces))
        pd.pread_into(999, memoryview(whole))
        assert whole == b"".join(pieces)


def test_a_read_past_the_end_of_a_file_cut_short_fails_the_pd(tmp_path: Path) -> None:
    """Issue 10 case 4: zeros with success hid a truncated PD from the RAID layer above."""
    with open_pd(tmp_path) as pd:
        heard: list[str] = []
        pd.add_failure_listener(lambda p, reason: heard.append(reason))
        pd.pwrite(0, b"\xff" * 8192)
        assert pd.file_problem() is None
        os.truncate(pd.path, 5000)  # someone cut the file short under us
        assert "shorter than the" in str(pd.file_problem())
        buf = bytearray(b"\x01" * 8192)
        with pytest.raises(MediumError, match="short read: it is 5000 bytes"):
            pd.pread_into(0, memoryview(buf))
        assert pd.failed and len(heard) == 1


def test_a_vectored_read_past_the_end_fails_the_pd(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        os.truncate(pd.path, 5000)
        bufs = [bytearray(3000) for _ in range(3)]
        with pytest.raises(MediumError, match="short read"):
            pd.preadv(1000, [memoryview(b) for b in bufs])
        assert pd.failed


def test_a_file_replaced_or_removed_at_its_path_is_a_problem(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        other = tmp_path / "other.img"
        other.write_bytes(bytes(8 * CHUNK))
        os.rename(other, pd.path)
        assert "is another file now" in str(pd.file_problem())
        os.unlink(pd.path)
        assert "no longer exists" in str(pd.file_problem())


def test_punch_reads_zeros_and_frees_space(tmp_path: Path) -> None:
    with open_pd(tmp_path, size=16 * MiB) as pd:
        pd.pwrite(0, b"\xab" * (4 * MiB))
        pd.fsync()
        used_before = os.stat(pd.path).st_blocks
        pd.punch(1000, 3 * MiB)
        buf = bytearray(4 * MiB)
        pd.pread_into(0, memoryview(buf))
        assert buf == b"\xab" * 1000 + bytes(3 * MiB) + b"\xab" * (MiB - 1000)
        assert os.stat(pd.path).st_blocks < used_before - (2 * MiB) // 512, "punch must free the blocks"
        assert os.stat(pd.path).st_size == 16 * MiB, "punch keeps the size"


def test_punch_falls_back_to_writing_zeros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def no_punch(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(pd_module, "fallocate_punch", no_punch)
    with open_pd(tmp_path, size=4 * MiB) as pd:
        pd.pwrite(0, b"\x5a" * (3 * MiB))
        pd.punch(10, int(2.5 * MiB))  # more than one zero chunk
        pd.punch(0, 5)  # the file system said no once: don't ask again
        buf = bytearray(3 * MiB)
        pd.pread_into(0, memoryview(buf))
        assert buf == bytes(5) + b"\x5a" * 5 + bytes(int(2.5 * MiB)) + b"\x5a" * (MiB // 2 - 10)
        assert len(calls) == 1
        assert not pd.failed


def test_punch_error_other_than_unsupported_fails_the_pd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def eio(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pd_module, "fallocate_punch", eio)
    with open_pd(tmp_path) as pd, pytest.raises(MediumError, match="punch error"):
        pd.punch(0, 4096)
    assert pd.failed


# --- failure ------------------------------------------------------------------------------
def test_listeners_hear_of_a_failure_once(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        heard: list[tuple[int, str]] = []
        pd.add_failure_listener(lambda p, reason: heard.append((p.id, reason)))
        pd.add_failure_listener(lambda p, reason: heard.append((-p.id, reason)))
        pd.fail("operator drill")
        pd.fail("again")
        with pytest.raises(MediumError):
            pd.pwrite(0, b"x")
        assert heard == [(1, "operator drill"), (-1, "operator drill")]
        assert pd.health is PDHealth.FAILED
        assert pd.failure_reason == "operator drill"


def test_a_raising_listener_does_not_stop_the_others(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        heard = []

        def bad(p: PhysicalDisk, reason: str) -> None:
            raise RuntimeError("listener bug")

        pd.add_failure_listener(bad)
        pd.add_failure_listener(lambda p, reason: heard.append(reason))
        pd.fail("x")
        assert heard == ["x"]


def test_removed_listener_is_not_called(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        heard = []

        def cb(p: PhysicalDisk, reason: str) -> None:
            heard.append(reason)

        pd.add_failure_listener(cb)
        pd.remove_failure_listener(cb)
        pd.remove_failure_listener(cb)  # twice is harmless
        pd.fail("x")
        assert heard == []


def test_every_io_on_a_failed_pd_raises_at_once(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        pd.pwrite(0, b"data")
        pd.fail("gone")
        buf = memoryview(bytearray(4))
        for call in (
            lambda: pd.pread_into(0, buf),
            lambda: pd.preadv(0, [buf]),
            lambda: pd.pwrite(0, b"x"),
            lambda: pd.pwritev(0, [b"x"]),
            lambda: pd.punch(0, 4096),
            pd.fsync,
        ):
            with pytest.raises(MediumError, match="has failed: gone"):
                call()


def test_injected_errors_fail_the_pd_like_eio(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        heard = []
        pd.add_failure_listener(lambda p, reason: heard.append(reason))
        pd.pwrite(0, b"fine")
        pd.inject_errors(True)
        with pytest.raises(MediumError, match="injected"):
            pd.pread_into(0, memoryview(bytearray(4)))
        assert pd.failed and len(heard) == 1 and "injected" in heard[0]
        pd.inject_errors(False)
        with pytest.raises(MediumError):  # a failed PD stays failed
            pd.pwrite(0, b"x")
        assert len(heard) == 1


def test_os_errors_fail_the_pd(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        heard = []
        pd.add_failure_listener(lambda p, reason: heard.append(reason))
        # Swap the descriptor for a read-only one: the write gets EBADF from the kernel.
        ro = os.open(pd.path, os.O_RDONLY)
        os.dup2(ro, pd.fd)
        os.close(ro)
        with pytest.raises(MediumError, match="write error at offset 4096"):
            pd.pwrite(4096, b"x" * 10)
        assert pd.failed and len(heard) == 1 and "Bad file descriptor" in heard[0]


def test_io_after_close_is_an_error_but_not_a_failure(tmp_path: Path) -> None:
    pd = open_pd(tmp_path)
    pd.close()
    pd.close()
    with pytest.raises(MediumError, match="closed"):
        pd.pwrite(0, b"x")
    assert not pd.failed


def test_pd_range_translates_offsets(tmp_path: Path) -> None:
    with open_pd(tmp_path) as pd:
        dev = pd.as_device(CHUNK, 2 * CHUNK)
        assert dev.size == 2 * CHUNK
        dev.write(10, b"hello")
        buf = bytearray(5)
        pd.pread_into(CHUNK + 10, memoryview(buf))
        assert buf == b"hello"
        assert dev.read(10, 5) == b"hello"
        dev.zero(0, 4096)
        assert dev.read(10, 5) == bytes(5)
        dev.flush()
        with pytest.raises(InvalidArgument):
            pd.as_device(7 * CHUNK, 2 * CHUNK)


# --- a full host file system (issue 10 case 5) ---------------------------------------------
def test_enospc_on_a_write_is_a_space_condition_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thinblock.errors import HostOutOfSpace, OutOfSpace

    with open_pd(tmp_path) as pd:
        pd.pwrite(0, b"\x11" * 4096)
        told: list[str] = []
        pd.on_no_space = lambda p, message: told.append(message)
        real_pwrite = os.pwrite

        def full(fd: int, data: object, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(HostOutOfSpace, match="host file system is full") as caught:
            pd.pwrite(8192, b"x" * 4096)
        assert isinstance(caught.value, OutOfSpace) and caught.value.reason == "pd-host-full"
        assert not pd.failed and len(told) == 1
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        buf = bytearray(4096)
        pd.pread_into(0, memoryview(buf))  # what was written stays readable
        assert buf == b"\x11" * 4096


def test_enospc_on_fsync_still_fails_the_pd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under fsync, ENOSPC means written pages were dropped: data lost, the PD is stale."""
    with open_pd(tmp_path) as pd:

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(MediumError):
            pd.fsync()
        assert pd.failed


def test_allocate_gives_the_range_real_blocks_or_says_the_host_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thinblock.errors import HostOutOfSpace

    with open_pd(tmp_path, size=4 * MiB) as pd:
        before = os.stat(pd.path).st_blocks
        pd.allocate(MiB, MiB)
        assert os.stat(pd.path).st_blocks * 512 >= before * 512 + MiB
        buf = bytearray(b"\x01" * 4096)
        pd.pread_into(MiB, memoryview(buf))
        assert buf == bytes(4096)  # allocated space reads zeros

        def full(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(pd_module, "fallocate_space", full)
        with pytest.raises(HostOutOfSpace):
            pd.allocate(2 * MiB, MiB)
        assert not pd.failed
