"""Drill: the link between the two nodes of a pair cut, each node still running (issue 12:
"never two owners of one volume").

n1 runs in this network namespace, n2 in one the test creates; a veth pair (made and removed by
the test) is the only way between them, and the mirror link runs over it.  Both reach their
PostgreSQL databases over the cluster's Unix socket, which no network cut touches: so each node
can still reach the store, as in a real pair whose interconnect fails and not its access to the
metadata.  With the veth down:

* n1 no longer hears n2: it degrades within the bound (``mirror-lost``, the ``mirror-degraded``
  alert) and its writer goes on, written through; no write fails;
* n2 no longer hears n1: it tries to take n1 over (``takeover-trying``) and is refused for as
  long as the cut lasts, because n1 renews its lease in the store: no ``takeover-start``, the
  lease ``node:n1`` keeps its holder and epoch, n1 never finds its lease lost;
* link back up: n1 resyncs (a new ``mirror-in-sync``), and every block reads back.

Skipped, with the reason, where network namespaces cannot be made (not root, no ``ip``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.drills.conftest import DRILL_SERVE_ARGS
from tests.drills.harness import Standard, add_pds, setup_pool, setup_volume, wait_until
from tests.drills.test_node_pair import PARTNER_TIMEOUT, Writer, check_every_block, mirror_alerts
from tests.drills.test_node_pair_postgres import lease_row, pg_node_config
from tests.support.daemon import Daemon
from tests.support.ports import free_port
from tests.support.postgres import PostgresCluster, fresh_database
from thinblock.units import MiB

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("node-pair")]

CUT_SECONDS = 10.0  # more than three lease times to live (3 s): n2 would have taken a lapsed lease


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Link:
    """A network namespace and a veth pair: ``root_end`` here, ``ns_end`` in the namespace."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = f"tbnp-{tag}"
        self.root_end, self.ns_end = f"tbv{tag}a", f"tbv{tag}b"
        octet = int(tag[:2], 16) % 250 + 1
        self.root_ip, self.ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"

    def create(self) -> None:
        _ip("netns", "add", self.ns)
        try:
            _ip("link", "add", self.root_end, "type", "veth", "peer", "name", self.ns_end)
            _ip("link", "set", self.ns_end, "netns", self.ns)
            _ip("addr", "add", f"{self.root_ip}/30", "dev", self.root_end)
            _ip("link", "set", self.root_end, "up")
            _ip("netns", "exec", self.ns, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_end)
            _ip("netns", "exec", self.ns, "ip", "link", "set", self.ns_end, "up")
            _ip("netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def cut(self) -> None:
        _ip("link", "set", self.root_end, "down")

    def restore(self) -> None:
        _ip("link", "set", self.root_end, "up")

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.root_end], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)


def netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2; `make setup` installs it)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


@pytest.fixture
def link() -> Iterator[Link]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    made = Link()
    try:
        made.create()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace and a veth pair here: {exc.stderr.strip()}")
    try:
        yield made
    finally:
        made.remove()


class NamespacedDaemon(Daemon):
    """A daemon started inside a network namespace (``ip netns exec`` execs it: same pid)."""

    def __init__(self, workdir: Path, ns: str, **kwargs: object) -> None:
        super().__init__(workdir, **kwargs)  # type: ignore[arg-type]
        self.ns = ns

    def _argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *super()._argv()]


async def test_the_link_cut_never_makes_two_owners_and_the_owner_degrades(
    tmp_path: Path, link: Link, postgres_cluster: PostgresCluster, make_daemon: Callable[..., Daemon]
) -> None:
    with fresh_database(postgres_cluster) as url1, fresh_database(postgres_cluster) as url2:
        p1, p2 = free_port(link.root_ip), free_port()  # p2: in a fresh namespace every port is free
        service = free_port("127.0.1.1")  # n2's takeover address: never bound (no takeover)
        n1 = make_daemon(
            "n1",
            config=pg_node_config("n1", p1, p2)
            .replace(f'mirror_listen = "127.0.0.1:{p1}"', f'mirror_listen = "{link.root_ip}:{p1}"')
            .replace(f'partner = "127.0.0.1:{p2}"', f'partner = "{link.ns_ip}:{p2}"'),
            args=("--metadata", url1),
        )
        takeover = (
            f'partner_data = "{n1.data_dir}"\npartner_service = "127.0.1.1:{service}"\n'
            f'partner_metadata = "{url1}"\n'
        )
        n2_config = (
            pg_node_config("n2", p2, p1, takeover=takeover)
            .replace(f'mirror_listen = "127.0.0.1:{p2}"', f'mirror_listen = "{link.ns_ip}:{p2}"')
            .replace(f'partner = "127.0.0.1:{p1}"', f'partner = "{link.root_ip}:{p1}"')
        )
        n2 = NamespacedDaemon(
            tmp_path / "n2",
            link.ns,
            config=n2_config,
            args=(*DRILL_SERVE_ARGS, "--metadata", url2),
            log_format="json",
        )
        try:
            n1.start()
            n2.start()
            await asyncio.to_thread(
                wait_until,
                lambda: bool(n1.events("mirror-in-sync") and n2.events("mirror-in-sync")),
                "the pair in sync over the veth",
            )
            add_pds(n1, Standard(count=2, size=64 * MiB), n1.workdir)
            setup_pool(n1, "p", 1)
            setup_volume(n1, "wb", "p", 64 * MiB, cache="writeback")
            lease_before = lease_row(url1, "node:n1")
            writer = Writer(n1, "wb")
            task = asyncio.create_task(writer.run())
            try:
                await writer.writes_after(0, 200)
                in_sync_before = len(n1.events("mirror-in-sync"))
                link.cut()
                cut_at = time.monotonic()
                try:
                    await asyncio.to_thread(
                        wait_until, lambda: bool(n1.events("mirror-lost")), "n1 degraded", 30
                    )
                    degraded_after = time.monotonic() - cut_at
                    await writer.writes_after(writer.seq, 200)  # written through
                    assert len(mirror_alerts(n1)) == 1
                    await asyncio.to_thread(
                        wait_until,
                        lambda: bool(n2.events("takeover-trying")),
                        "n2 trying to take n1 over",
                        30,
                    )
                    while time.monotonic() - cut_at < CUT_SECONDS:
                        assert n2.events("takeover-start") == [], "n2 took n1 over while n1 held its lease"
                        assert lease_row(url1, "node:n1") == lease_before
                        await asyncio.sleep(0.5)
                finally:
                    link.restore()
                await asyncio.to_thread(
                    wait_until,
                    lambda: len(n1.events("mirror-in-sync")) > in_sync_before,
                    "the mirror back in sync after the link came back",
                    60,
                )
                await writer.writes_after(writer.seq, 200)
            finally:
                writer.stop.set()
                await task
            assert writer.errors == [], writer.errors[:3]
            assert n2.events("takeover-start") == [] and lease_row(url1, "node:n1") == lease_before
            assert not any(a["kind"] == "lease-lost" for a in n1.alerts())
            checked = await check_every_block(n1, "wb", writer.acked)
            print(
                f"node-pair link-cut drill: cut {CUT_SECONDS:.0f} s, n1 degraded {degraded_after:.2f} s after"
                f" the cut (bound {PARTNER_TIMEOUT} s), longest write {writer.longest_wait:.2f} s,"
                f" n2 refused the takeover throughout (lease {lease_before}), {writer.seq} writes,"
                f" {checked} blocks checked, lost 0"
            )
            assert n1.stop() == 0
            assert n2.stop() == 0
        finally:
            n2.kill()
