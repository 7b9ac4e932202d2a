"""Snapshots with real clients: a snapshot is exported read-only (NBD_FLAG_READ_ONLY, EPERM for
writes); qemu-img copies a stable image from it while qemu-io, or fio, keeps writing the volume; a clone
is writable and isolated; the REST API and the CLI (``--json``) make and list them."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.drills.nbd_client import NBDClient, NBDError
from tests.engine_machine import assert_space_map_matches_the_store
from thinblock.api.app import NodeInfo, create_app
from thinblock.cli import main
from thinblock.engine import Engine
from thinblock.nbd.constants import TransmissionFlags
from thinblock.nbd.server import NBDServer
from thinblock.units import Limit

from .nbd_helpers import run
from .snapshot_fixtures import SIZE

pytestmark = pytest.mark.e2e

MiB = 1 << 20


async def test_a_snapshot_export_is_read_only_and_stable_under_writes(
    snapshots_served: tuple[Engine, NBDServer], tmp_path: Path
) -> None:
    engine, server = snapshots_served
    base = f"nbd://127.0.0.1:{server.port}"
    (await run("qemu-io", "-f", "raw", "-c", f"write -P 0x11 0 {SIZE}", f"{base}/v")).check()
    await engine.snapshot_vv("v", "s")
    info = json.loads((await run("nbdinfo", "--json", f"{base}/s")).check().out)
    assert info["exports"][0]["is_read_only"] is True
    refused = await run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", f"{base}/s")
    assert refused.code != 0 and "Permission denied" in refused.err, refused  # qemu saw READ_ONLY
    async with await NBDClient.connect("127.0.0.1", server.port, "s") as client:  # one that sends anyway
        assert client.transmission_flags & TransmissionFlags.READ_ONLY
        with pytest.raises(NBDError, match="EPERM"):
            await client.write(0, b"\x01" * 4096)
        assert await client.read(0, 4096) == b"\x11" * 4096
    # A backup of the snapshot while the volume is rewritten: the image is the snapshot's moment.
    image = tmp_path / "backup.raw"
    writer = asyncio.ensure_future(run("qemu-io", "-f", "raw", "-c", f"write -P 0x22 0 {SIZE}", f"{base}/v"))
    (await run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"{base}/s", str(image))).check()
    (await writer).check()
    assert image.read_bytes() == b"\x11" * SIZE
    (await run("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x22 0 {SIZE}", f"{base}/v")).check()
    (await run("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x11 0 {SIZE}", f"{base}/s")).check()
    # A clone of it is writable, and the snapshot does not see the clone's writes.
    await engine.clone_vv("s", "c")
    (await run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", f"{base}/c")).check()
    (await run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 64k", f"{base}/s")).check()
    (await run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x22 0 64k", f"{base}/v")).check()
    assert_space_map_matches_the_store(engine)


async def test_a_backup_of_a_snapshot_while_fio_writes_the_volume(
    snapshots_served: tuple[Engine, NBDServer], tmp_path: Path
) -> None:
    """The issue's real-client case: qemu-img convert copies a snapshot's export while fio (its
    NBD engine, four connections, random writes of several sizes) rewrites the volume; the image
    is the snapshot's moment exactly, and fio's own verification of the volume passes after."""
    engine, server = snapshots_served
    base = f"nbd://127.0.0.1:{server.port}"
    pattern = bytes(range(256)) * (SIZE // 256)
    await engine.volume("v").write(0, pattern)
    await engine.snapshot_vv("v", "s")
    fio = [
        "fio",
        "--name=rewrite",
        "--ioengine=nbd",
        f"--uri={base}/v",
        "--thread",
        "--numjobs=4",
        "--iodepth=8",
        f"--size={SIZE // 4}",
        f"--offset_increment={SIZE // 4}",
        "--bsrange=4k-64k",
        "--rw=randwrite",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--randseed=77",
        "--group_reporting",
        "--output-format=json",
    ]
    writer = asyncio.ensure_future(run(*fio, "--do_verify=0", cwd=tmp_path))
    image = tmp_path / "backup.raw"
    (await run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"{base}/s", str(image))).check()
    result = (await writer).check()
    job = json.loads(result.out[result.out.index("{") :])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= SIZE // 2, job["write"]
    assert image.read_bytes() == pattern, "the backup is not the snapshot's moment"
    (await run(*fio, "--verify_only", cwd=tmp_path)).check()  # the volume holds fio's writes
    assert bytes(await engine.volume("s").read(0, SIZE)) == pattern
    assert_space_map_matches_the_store(engine)


async def test_the_api_and_cli_make_and_list_snapshots_and_clones(
    snapshots_served: tuple[Engine, NBDServer],
) -> None:
    engine, _server = snapshots_served
    await engine.volume("v").write(0, b"\x05" * (256 * 1024))
    async with cli_against(engine) as cli:
        code, out, _ = await cli("vv", "snapshot", "v", "s", "--json")
        made = json.loads(out)
        assert code == 0 and (made["kind"], made["parent"], made["shared"]) == ("snapshot", "v", 256 * 1024)
        code, out, _ = await cli("vv", "clone", "s", "c", "--json")
        assert code == 0 and json.loads(out)["kind"] == "clone"
        code, out, _ = await cli("vv", "list", "--json")
        listed = {v["name"]: v for v in json.loads(out)}
        assert listed["v"]["children"] == ["s"] and listed["s"]["children"] == ["c"]
        assert listed["c"]["parent"] == "s" and listed["v"]["exclusive"] == 0
        code, out, _ = await cli("vv", "list")
        assert code == 0 and "└ s (snap)" in out and "└ c (clone)" in out
        # Bad input: one clear line each, nothing changed.
        for argv, message in (
            (("vv", "clone", "v", "x"), "'v' is not a snapshot"),
            (("vv", "snapshot", "nope", "x"), "volume 'nope' not found"),
            (("vv", "snapshot", "v", "s"), "volume 's' already exists"),
        ):
            code, out, err = await cli(*argv)
            assert code != 0 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert sorted(v.name for v in engine.list_vvs()) == ["c", "s", "v"]
        response = await cli.api.post("/api/v1/volumes/s/snapshots", json={"name": "x"})
        assert response.status_code == 400 and "is a snapshot already" in response.text


class InProcessCLI:
    """``thinblock`` CLI commands run in a thread against the engine's REST API (``api``),
    answered by the ASGI app on the test's event loop: ``code, out, err = await cli("vv", "list")``."""

    def __init__(self, api: httpx.AsyncClient) -> None:
        self.api = api
        self._bridge = _sync_bridge(api)

    def _call(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main([*argv], transport=self._bridge, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(self._call, *argv)


@contextlib.asynccontextmanager
async def cli_against(engine: Engine) -> AsyncIterator[InProcessCLI]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(engine, NodeInfo())), base_url="http://t"
    ) as api:
        yield InProcessCLI(api)


def _sync_bridge(api: httpx.AsyncClient) -> httpx.BaseTransport:
    """The CLI's synchronous client, answered by the ASGI app on the test's event loop."""
    loop = asyncio.get_running_loop()

    class Bridge(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            async def forward() -> httpx.Response:
                response = await api.request(
                    request.method, str(request.url.copy_with(scheme="http", host="t", port=None)),
                    content=request.read(), headers=request.headers,
                )  # fmt: skip
                return httpx.Response(
                    response.status_code, content=response.content, headers=response.headers
                )

            return asyncio.run_coroutine_threadsafe(forward(), loop).result(30)

    return Bridge()


async def test_the_api_and_cli_revert_and_diff(snapshots_served: tuple[Engine, NBDServer]) -> None:
    engine, _server = snapshots_served
    v = engine.volume("v")
    await v.write(0, b"\x05" * (256 * 1024))
    await engine.snapshot_vv("v", "full")
    await v.write(64 * 1024, b"\x06" * 4096)  # region 1 (64 KiB regions)
    await v.write(10 * 64 * 1024, b"\x07" * 4096)  # region 10
    async with cli_against(engine) as cli:
        code, out, _ = await cli("vv", "diff", "full", "v", "--json")
        diff = json.loads(out)
        assert code == 0 and diff["extents"] == [
            {"offset": 64 * 1024, "length": 64 * 1024},
            {"offset": 10 * 64 * 1024, "length": 64 * 1024},
        ]
        assert diff["bytes"] == 128 * 1024 and diff["region_size"] == 64 * 1024
        code, out, _ = await cli("vv", "diff", "full", "v")
        assert code == 0 and "128 KiB differ" in out
        session = engine.sessions.open("NBD", "v", "127.0.0.1:7000", disconnect=lambda: None)
        code, _, err = await cli("vv", "revert", "v", "full")
        assert code != 0 and "in use by 1 NBD client from 127.0.0.1:7000" in err and "--force" in err
        assert len(err.strip().splitlines()) == 1
        code, out, _ = await cli("vv", "revert", "v", "full", "--force", "--json")
        engine.sessions.close(session)
        assert code == 0 and json.loads(out)["allocated"] == 256 * 1024
        assert bytes(await v.read(0, SIZE)) == b"\x05" * (256 * 1024) + bytes(SIZE - 256 * 1024)
        code, out, _ = await cli("vv", "diff", "full", "v", "--json")
        assert json.loads(out)["extents"] == []


@pytest.mark.parametrize("policy", ["fail", "invalidate-oldest"])
async def test_snapshot_space_warning_and_limit_with_qemu_io(
    snapshots_served: tuple[Engine, NBDServer], policy: str
) -> None:
    """qemu-io writes a volume whose snapshot holds what it overwrites: past the snapshot space
    warning an alert, at the limit another; the next write needing a copy on write either fails
    with "No space left on device" (fail: the snapshot and the volume unchanged) or deletes the
    snapshot, names it in an alert and goes on (invalidate-oldest)."""
    engine, server = snapshots_served
    uri = f"nbd://127.0.0.1:{server.port}"
    region = 64 * 1024
    await engine.set_vv(
        "v",
        snapshot_warning=Limit(bytes=2 * region),
        snapshot_limit=Limit(bytes=4 * region),
        snapshot_limit_policy=policy,
    )
    (await run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", f"{uri}/v")).check()
    await engine.snapshot_vv("v", "monday")

    def open_kinds() -> set[str]:  # v's open snapshot space conditions (not the events)
        return {
            a.kind.value
            for a in engine.list_alerts()
            if a.object == "vv:v"
            and a.state.value != "cleared"
            and a.kind.value.startswith("vv-snapshot-space")
        }

    (await run("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 128k", f"{uri}/v")).check()  # 2 regions copied
    assert engine.get_vv("v").snapshot_space == 2 * region
    assert open_kinds() == {"vv-snapshot-space-warning"}
    (
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x22 128k 128k", f"{uri}/v")
    ).check()  # 4: at the limit
    assert open_kinds() == {"vv-snapshot-space-warning", "vv-snapshot-space-limit"}
    attempt = await run("qemu-io", "-f", "raw", "-c", "write -P 0x33 256k 64k", f"{uri}/v")
    if policy == "fail":
        assert "No space left on device" in attempt.out + attempt.err, attempt
        (await run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 1M", f"{uri}/monday")).check()
        (await run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x22 0 256k", f"{uri}/v")).check()
        (await run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 256k 768k", f"{uri}/v")).check()
        assert engine.get_vv("v").snapshot_space == 4 * region
        # Deleting the snapshot frees its space: both alerts clear, the write goes through.
        await engine.delete_vv("monday")
        assert open_kinds() == set()
        (await run("qemu-io", "-f", "raw", "-c", "write -P 0x33 256k 64k", f"{uri}/v")).check()
    else:
        attempt.check()
        assert "No space left" not in attempt.out + attempt.err
        assert "monday" not in {i.name for i in engine.list_vvs()}
        [event] = [a for a in engine.list_alerts() if a.kind.value == "vv-snapshot-invalidated"]
        assert "'monday' was deleted" in event.message
        assert open_kinds() == set()  # no snapshot, no snapshot space
        gone = await run("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", f"{uri}/monday")
        assert gone.code != 0
    (await run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 256k 64k", f"{uri}/v")).check()
    assert_space_map_matches_the_store(engine)


async def test_bad_input_with_a_real_client_connected(snapshots_served: tuple[Engine, NBDServer]) -> None:
    """Issue 14 item 6 with a real NBD client on the volume: the revert is refused in one line
    saying why and what to do (--force), a clone of the live volume says to take a snapshot, a
    clone name already taken is refused; nothing changed, and the connected client still reads
    and writes."""
    engine, server = snapshots_served
    await engine.volume("v").write(0, b"\x05" * 65536)
    await engine.snapshot_vv("v", "s")
    await engine.volume("v").write(0, b"\x06" * 65536)
    async with (
        cli_against(engine) as cli,
        await NBDClient.connect("127.0.0.1", server.port, "v") as client,
    ):
        before = sorted((v.name, v.allocated, v.kind) for v in engine.list_vvs())
        for argv, message in (
            (("vv", "revert", "v", "s"), "is in use by 1 NBD client from 127.0.0.1:"),
            (("vv", "clone", "v", "x"), "take one first (thinblock vv snapshot v SNAP), then clone it"),
            (("vv", "clone", "s", "v"), "volume 'v' already exists"),
            (("vv", "snapshot", "nope", "x"), "volume 'nope' not found"),
        ):
            code, _, err = await cli(*argv)
            assert code != 0 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        code, _, err = await cli("vv", "revert", "v", "s")
        assert "reverting it under them would leave their caches holding data it no longer has" in err
        assert "disconnect them or use --force" in err
        assert sorted((v.name, v.allocated, v.kind) for v in engine.list_vvs()) == before
        assert await client.read(0, 65536) == b"\x06" * 65536  # not reverted
        await client.write(0, b"\x07" * 4096)  # and still served
        assert await client.read(0, 4096) == b"\x07" * 4096
