"""Whether a path may become a PD: ``pd add`` must not be able to hurt the host.

A PD is written from its first byte (the header) to its last, so taking the wrong file or disk
destroys whatever was there.  Before anything is opened for writing, ``vet_pd_path`` checks:

* **Paths are resolved.**  A relative path is the caller's to make absolute (the API takes it
  from the data directory).  The final component may be a symlink only to a block device
  (``/dev/disk/by-id/...`` is how disks are named); a symlink to anything else is refused, so
  a link planted in an allowed directory cannot point a PD at a host file.
* **Files stay where they belong.**  A regular file (existing or to be created) must resolve to
  a place inside the data directory or one of the configured allowed roots.
* **Nothing is created under /dev.**  ``pd add /dev/sdX`` for a disk that is not there would
  otherwise create a RAM-backed file in devtmpfs.  Missing paths under /dev are refused.
* **An existing regular file** is taken when it holds no data (empty, or all holes) or is a
  thinblock PD of this data directory.  A PD of another data directory (its header says so:
  physical/header.py) is refused.  A file with data is refused unless ``force`` and the typed
  confirmation (its path) say the administrator means it (an old image file to reuse; a file
  system that cannot report holes, such as FUSE, reads as "data" everywhere).
* **Block devices** must exist, must not be mounted or held by the kernel (an ``O_EXCL`` open:
  the kernel refuses it with EBUSY for a mounted file system, an md/dm member, active swap), and
  when they carry a partition table or a file system signature (or another data directory's
  PD header) need ``force`` plus a typed confirmation: the device path itself.

Out of scope: a device that another process has open without ``O_EXCL`` (a VM's raw disk) is
not detectable this way; the administrator's confirmation covers signatures, not that.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from .header import HeaderError, read_header

DEV = Path("/dev")
DEV_SHM = Path("/dev/shm")  # the one RAM file system under /dev meant for files (tmpfs)
PROBE_BYTES = 68 * 1024  # every signature below lies in the first 68 KiB

# (offset, magic, what): partition tables and the file systems / volume managers one meets.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (512, b"EFI PART", "a GPT partition table"),
    (0, b"XFSB", "an XFS file system"),
    (1080, b"\x53\xef", "an ext2/3/4 file system"),
    (65600, b"_BHRfS_M", "a Btrfs file system"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (512, b"LABELONE", "an LVM physical volume"),
    (4086, b"SWAPSPACE2", "swap space"),
    (4086, b"SWAP-SPACE", "swap space"),
    (32769, b"CD001", "an ISO 9660 file system"),
    (3, b"NTFS    ", "an NTFS file system"),
    (82, b"FAT32   ", "a FAT32 file system"),
    (54, b"FAT1", "a FAT file system"),
    (4096, b"\xfc\x4e\x2b\xa9", "an md RAID member"),
    (0, b"\x00\x00\x00\x00\x00\x00\x00\x00BCACHE", "a bcache device"),
)


@dataclass(frozen=True, slots=True)
class Admission:
    """A path cleared to be a PD: where it really is and what it is."""

    path: str  # resolved (a block device: the name given, which may be a by-id link)
    is_block_device: bool
    exists: bool
    empty_file: bool  # an existing regular file of length 0 (to be extended to the PD's size)


def signatures(head: bytes) -> list[str]:
    """What the first bytes of a device say it holds (partition table, file system, ...)."""
    found = [what for offset, magic, what in _SIGNATURES if head[offset : offset + len(magic)] == magic]
    # An MBR: the boot signature, and a partition entry with a type (an ext/xfs volume on a
    # whole disk has neither at offset 510 besides chance, which the type check narrows).
    if head[510:512] == b"\x55\xaa" and any(head[446 + 16 * i + 4] != 0 for i in range(4)):
        found.append("an MBR partition table")
    return found


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _in_dev(path: Path) -> bool:
    """Under /dev (devtmpfs: files there are RAM, and look like devices), /dev/shm excepted."""
    return _inside(path, [DEV]) and not _inside(path, [DEV_SHM])


def _holds_data(fd: int) -> bool:
    """Whether a regular file has any data extent (a file of holes only reads as zeros)."""
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise
    return True


def vet_pd_path(
    path: str | os.PathLike[str],
    *,
    data_dir: Path,
    data_dir_id: str | None,
    allowed_roots: Iterable[Path] | None,
    force: bool = False,
    confirm: str | None = None,
) -> Admission:
    """Check ``path`` (absolute) against the rules above; InvalidArgument naming what is wrong.

    ``allowed_roots`` None: regular files may lie anywhere (the engine's default for tests and
    embedding; the daemon always passes the data directory and ``engine.pd_allowed_roots``)."""
    given = Path(os.fspath(path))
    if not given.is_absolute():
        raise InvalidArgument(f"a PD path must be absolute here, not {given}")
    try:
        link = given.is_symlink()
        resolved = given.resolve(strict=False)
        st: os.stat_result | None = os.stat(resolved)
    except FileNotFoundError:
        st = None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise InvalidArgument(f"cannot use {given} as a PD: {exc}") from None

    if st is None:
        if link:
            raise InvalidArgument(f"{given} is a symlink to {resolved}, which does not exist")
        if _in_dev(resolved) or _in_dev(given):
            raise InvalidArgument(
                f"{given} does not exist: a block device must exist already "
                "(thinblock never creates files under /dev)"
            )
        _check_roots(given, resolved, data_dir, allowed_roots)
        return Admission(str(resolved), is_block_device=False, exists=False, empty_file=False)

    if stat.S_ISBLK(st.st_mode):
        _check_block_device(str(resolved), given, data_dir_id, force, confirm)
        # The name given stays (a /dev/disk/by-id/ link survives renumbering; /dev/sdX may not).
        return Admission(str(given), is_block_device=True, exists=True, empty_file=False)
    if link:
        raise InvalidArgument(
            f"{given} is a symlink (to {resolved}): a PD may be a symlink only to a block device"
        )
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{given} is neither a regular file nor a block device")
    if _in_dev(resolved):
        raise InvalidArgument(f"{given} is a regular file under /dev, not a block device")
    _check_roots(given, resolved, data_dir, allowed_roots)
    _check_existing_file(str(resolved), given, data_dir_id, force, confirm)
    return Admission(str(resolved), is_block_device=False, exists=True, empty_file=st.st_size == 0)


def _check_roots(given: Path, resolved: Path, data_dir: Path, allowed_roots: Iterable[Path] | None) -> None:
    if allowed_roots is None:
        return
    roots = [data_dir.resolve(), *(Path(r).resolve() for r in allowed_roots)]
    if not _inside(resolved, roots):
        where = ", ".join(str(r) for r in roots)
        shown = given if given == resolved else f"{given} (really {resolved})"
        raise InvalidArgument(
            f"{shown} is outside the data directory and the allowed roots ({where}): "
            "add its directory to engine.pd_allowed_roots to use it"
        )


def _check_existing_file(
    path: str, given: Path, data_dir_id: str | None, force: bool, confirm: str | None
) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise InvalidArgument(f"cannot open {given}: {exc.strerror}") from None
    try:
        if os.fstat(fd).st_size == 0 or not _holds_data(fd):
            return
        if _check_header(fd, given, data_dir_id, data_refusal=None):
            return
    finally:
        os.close(fd)
    _confirmed(given, path, "data and is not a thinblock PD", force, confirm)


def _check_header(fd: int, given: Path, data_dir_id: str | None, *, data_refusal: str | None) -> bool:
    """Refuse another data directory's PD; True for one of ours; for anything else refuse with
    ``data_refusal`` (when given) or return False."""
    try:
        header = read_header(fd)
    except HeaderError as exc:
        raise InvalidArgument(f"{given} has a damaged thinblock header ({exc}): not taken") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read {given}: {exc.strerror}") from None
    if header is not None:
        if data_dir_id is not None and header.data_dir_id != data_dir_id:
            raise InvalidArgument(
                f"{given} is PD {header.pd_id} of another data directory ({header.data_dir_id}): "
                "not taken (remove it from that one first)"
            )
        return True
    if data_refusal is not None:
        raise InvalidArgument(f"{given} is refused: {data_refusal} (thinblock never overwrites a host file)")
    return False


def _check_block_device(
    path: str, given: Path, data_dir_id: str | None, force: bool, confirm: str | None
) -> None:
    mounted = _mount_point_of(os.stat(path).st_rdev)
    if mounted is not None:
        raise InvalidArgument(f"{given} is mounted on {mounted}: not taken")
    try:
        # O_EXCL on a block device: the kernel refuses (EBUSY) when it is mounted or claimed
        # (md/dm member, active swap, another O_EXCL opener).
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise InvalidArgument(
                f"{given} is in use (mounted, or held by md/dm, swap or another program)"
            ) from None
        raise InvalidArgument(f"cannot open {given}: {exc.strerror}") from None
    try:
        if _check_header(fd, given, data_dir_id, data_refusal=None):
            return  # one of ours (removed earlier): no signature question
        try:
            head = os.pread(fd, PROBE_BYTES, 0)
        except OSError as exc:
            raise InvalidArgument(f"cannot read {given}: {exc.strerror}") from None
    finally:
        os.close(fd)
    found = signatures(head)
    if found:
        _confirmed(given, path, " and ".join(found), force, confirm)


def _confirmed(given: Path, path: str, holds: str, force: bool, confirm: str | None) -> None:
    """Taking what ``given`` holds destroys it: only with ``force`` and its path typed again."""
    if not force:
        raise InvalidArgument(
            f"{given} holds {holds}: everything in it would be destroyed; "
            f"give --force and confirm by typing its path ({given})"
        )
    if confirm not in (str(given), path):
        raise InvalidArgument(
            f"{given} holds {holds}: the confirmation must be its path ({given}), not {confirm!r}"
        )


def _mount_point_of(rdev: int) -> str | None:
    """Where a block device is mounted, from /proc/self/mountinfo (None when it is not)."""
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] == wanted:
                    return fields[4]
    except OSError:
        return None
    return None


__all__ = ["Admission", "signatures", "vet_pd_path"]
