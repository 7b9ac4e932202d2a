"""``pd add`` cannot hurt the host (thinblock.physical.admission through Engine.add_pd).

Each refusal is checked to leave the host as it was: the file's bytes, no file created.  Block
device cases use a loop device over a file in the test's temporary directory (root and
losetup needed; skipped with the reason otherwise) and are cleaned up even when they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from thinblock.engine import Engine, EngineOptions
from thinblock.errors import InvalidArgument
from thinblock.physical.admission import signatures
from thinblock.units import MiB

CHUNKLET = MiB


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    # As the daemon runs it: files only in the data directory and the allowed roots.
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    eng = await Engine.open(
        tmp_path / "data", EngineOptions(pd_allowed_roots=(allowed,), pd_check_interval=0)
    )
    yield eng
    await eng.close()


def _host_file(path: Path) -> bytes:
    content = b"precious host data\n" * 200_000
    path.write_bytes(content)
    return content


async def test_a_host_file_with_data_is_refused(engine: Engine, tmp_path: Path) -> None:
    victim = tmp_path / "data" / "notes.txt"
    content = _host_file(victim)
    with pytest.raises(InvalidArgument, match=r"holds data and is not a thinblock PD.*--force"):
        await engine.add_pd(victim, chunklet_size=CHUNKLET)
    with pytest.raises(InvalidArgument, match="the confirmation must be its path"):
        await engine.add_pd(victim, chunklet_size=CHUNKLET, force=True, confirm="yes")
    assert victim.read_bytes() == content and engine.list_pds() == []
    # The administrator who means it (an old image to reuse) types the path.
    pd = await engine.add_pd(victim, chunklet_size=CHUNKLET, force=True, confirm=str(victim))
    assert pd.path == str(victim.resolve())


async def test_symlinks_are_refused_unless_to_a_block_device(engine: Engine, tmp_path: Path) -> None:
    victim = tmp_path / "outside.img"
    content = _host_file(victim)
    link = tmp_path / "data" / "pd-link.img"
    link.symlink_to(victim)
    with pytest.raises(InvalidArgument, match=r"symlink .*only to a block device"):
        await engine.add_pd(link, 64 * MiB, CHUNKLET)
    # Even to an empty file inside the data directory: a link is never a file PD.
    empty = tmp_path / "data" / "empty.img"
    empty.touch()
    link2 = tmp_path / "data" / "pd-link2.img"
    link2.symlink_to(empty)
    with pytest.raises(InvalidArgument, match="symlink"):
        await engine.add_pd(link2, 64 * MiB, CHUNKLET)
    dangling = tmp_path / "data" / "dangling.img"
    dangling.symlink_to(tmp_path / "nowhere.img")
    with pytest.raises(InvalidArgument, match="does not exist"):
        await engine.add_pd(dangling, 64 * MiB, CHUNKLET)
    assert not (tmp_path / "nowhere.img").exists()
    assert victim.read_bytes() == content and empty.stat().st_size == 0 and engine.list_pds() == []


async def test_paths_outside_the_data_dir_and_allowed_roots_are_refused(
    engine: Engine, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for path in (
        outside / "pd.img",
        tmp_path / "data" / ".." / "escaped.img",
        Path("/tmp") / "..." / "x.img",
    ):
        with pytest.raises(InvalidArgument, match="outside the data directory and the allowed roots"):
            await engine.add_pd(path, 64 * MiB, CHUNKLET)
    assert list(outside.iterdir()) == [] and not (tmp_path / "escaped.img").exists()
    # A directory symlink inside the data directory leading out is judged where it leads.
    (tmp_path / "data" / "sub").symlink_to(outside)
    with pytest.raises(InvalidArgument, match="really"):
        await engine.add_pd(tmp_path / "data" / "sub" / "pd.img", 64 * MiB, CHUNKLET)
    assert list(outside.iterdir()) == []
    # Inside the data directory and an allowed root: created.
    inside = await engine.add_pd(tmp_path / "data" / "pd0.img", 64 * MiB, CHUNKLET)
    allowed = await engine.add_pd(tmp_path / "allowed" / "pd1.img", 64 * MiB, CHUNKLET)
    assert [inside.path, allowed.path] == [
        str((tmp_path / "data" / "pd0.img").resolve()),
        str((tmp_path / "allowed" / "pd1.img").resolve()),
    ]


async def test_empty_and_hole_only_files_are_taken(engine: Engine, tmp_path: Path) -> None:
    empty = tmp_path / "data" / "empty.img"
    empty.touch()
    with pytest.raises(InvalidArgument, match="is empty; give a size"):
        await engine.add_pd(empty, chunklet_size=CHUNKLET)
    pd = await engine.add_pd(empty, 8 * MiB, CHUNKLET)
    assert pd.size == 8 * MiB
    holes = tmp_path / "data" / "holes.img"
    with holes.open("wb") as f:
        f.truncate(16 * MiB)
    assert (await engine.add_pd(holes, chunklet_size=CHUNKLET)).chunklets > 0


async def test_a_missing_dev_path_is_never_created(engine: Engine) -> None:
    missing = Path("/dev/thinblock-test-no-such-disk")
    assert not missing.exists()
    with pytest.raises(InvalidArgument, match="must exist already"):
        await engine.add_pd(missing, 64 * MiB, CHUNKLET)
    assert not missing.exists()
    # The same through a name that resolves into /dev.
    with pytest.raises(InvalidArgument, match="must exist already"):
        await engine.add_pd("/dev/../dev/thinblock-test-no-such-disk", 64 * MiB, CHUNKLET)
    assert not missing.exists()


def test_signatures_of_partition_tables_and_file_systems() -> None:
    blank = bytearray(70 * 1024)
    assert signatures(bytes(blank)) == []
    gpt = bytearray(blank)
    gpt[512:520] = b"EFI PART"
    assert signatures(bytes(gpt)) == ["a GPT partition table"]
    mbr = bytearray(blank)
    mbr[510:512] = b"\x55\xaa"
    assert signatures(bytes(mbr)) == []  # a boot signature without a partition is not a table
    mbr[446 + 4] = 0x83
    assert signatures(bytes(mbr)) == ["an MBR partition table"]
    ext = bytearray(blank)
    ext[1080:1082] = b"\x53\xef"
    assert signatures(bytes(ext)) == ["an ext2/3/4 file system"]


# --- block devices (loop devices) ----------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup (util-linux): the mounted-device case is not run")
    backing = tmp_path / "loop-backing.img"
    with backing.open("wb") as f:
        f.truncate(64 * MiB)
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device available here ({made.stderr.strip()})")
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


def _mkfs(device: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    subprocess.run(["mkfs.ext4", "-q", "-F", str(device)], check=True, capture_output=True)


async def test_a_mounted_device_is_refused_even_with_force(
    engine: Engine, loop_device: Path, tmp_path: Path
) -> None:
    _mkfs(loop_device)
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", str(loop_device), str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount here ({mounted.stderr.strip()})")
    try:
        (mount_point / "file").write_text("data on a mounted file system")
        with pytest.raises(InvalidArgument, match="is mounted on"):
            await engine.add_pd(loop_device, chunklet_size=CHUNKLET, force=True, confirm=str(loop_device))
        assert engine.list_pds() == []
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
    # Unmounted, it still holds a file system: --force and the typed path are needed.
    with pytest.raises(InvalidArgument, match=r"holds an ext2/3/4 file system.*--force"):
        await engine.add_pd(loop_device, chunklet_size=CHUNKLET)
    with pytest.raises(InvalidArgument, match="confirmation must be its path"):
        await engine.add_pd(loop_device, chunklet_size=CHUNKLET, force=True, confirm="yes")
    assert engine.list_pds() == []
    pd = await engine.add_pd(loop_device, chunklet_size=CHUNKLET, force=True, confirm=str(loop_device))
    assert pd.path == str(loop_device)


async def test_a_device_held_open_exclusively_is_refused(engine: Engine, loop_device: Path) -> None:
    holder = os.open(loop_device, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(InvalidArgument, match="is in use"):
            await engine.add_pd(loop_device, chunklet_size=CHUNKLET)
    finally:
        os.close(holder)
    # A blank device needs no confirmation; a symlink to it (as /dev/disk/by-id/) is its name.
    link = engine.data_dir / "by-id-disk"
    link.symlink_to(loop_device)
    pd = await engine.add_pd(link, chunklet_size=CHUNKLET)
    assert pd.path == str(link)
