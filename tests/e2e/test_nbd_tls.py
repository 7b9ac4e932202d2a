"""NBD over TLS (NBD_OPT_STARTTLS) with clients no one here wrote: libnbd's nbdinfo (``nbds://``
URIs with ``tls-certificates=``) and qemu's qemu-img / qemu-io (``--object tls-creds-x509``).

Certificates are made by the test (tests/support/certs.py) in its temporary directory: a CA,
the server's certificate for 127.0.0.1, and a client certificate the server checks against the
CA.  A plain client, and a TLS client without a client certificate, are refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.certs import Pki, make_pki
from tests.support.daemon import SMALL_CONFIG, Daemon, running_daemon, start_daemon

from .client_tools import run_tool

pytestmark = pytest.mark.e2e


def _config(pki: Pki, mode: str) -> str:
    return (
        f'[nbd]\ntls = "{mode}"\ntls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
        f'tls_ca = "{pki.ca_cert}"\n' + SMALL_CONFIG
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    for tool in ("nbdinfo", "qemu-io", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Makefile APT_PKGS: libnbd-bin, qemu-utils)")
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_daemon(tmp_path: Path, pki: Pki) -> Iterator[Daemon]:
    with running_daemon(tmp_path, config=_config(pki, "required"), clean_stop=True) as d:
        yield d


def _qemu_tls(pki: Pki, port: int, export: str) -> list[str]:
    return [
        "--object",
        f"tls-creds-x509,id=tls0,endpoint=client,dir={pki.dir}",
        "--image-opts",
        f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0",
    ]


def test_required_tls_with_libnbd_and_qemu(tls_daemon: Daemon, pki: Pki) -> None:
    d = tls_daemon
    assert d.nbd_url is not None and d.nbd_url.startswith("nbds://127.0.0.1:")
    uri = f"{d.nbd_url}/vol0?tls-certificates={pki.dir}"
    assert int(run_tool("nbdinfo", "--size", uri).stdout) == 1024**3
    listed = run_tool("nbdinfo", "--list", "--json", f"{d.nbd_url}/?tls-certificates={pki.dir}").stdout
    assert '"vol0"' in listed

    # qemu writes through TLS; libnbd reads it back through TLS.
    qemu = _qemu_tls(pki, d.nbd_port, "vol0")
    written = run_tool("qemu-io", *qemu, "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k")
    assert "wrote 65536/65536" in written.stdout and "read 65536/65536" in written.stdout, written.stdout
    info = run_tool("qemu-img", "info", "--output=json", *qemu).stdout
    assert '"virtual-size": 1073741824' in info

    # A plain client: every option but STARTTLS gets NBD_REP_ERR_TLS_REQD; nothing is served.
    plain = subprocess.run(
        ["nbdinfo", f"nbd://127.0.0.1:{d.nbd_port}/vol0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LIBNBD_DEBUG": "1"},
    )
    assert plain.returncode != 0
    assert "TLS is required: send NBD_OPT_STARTTLS first" in plain.stderr, plain.stderr[-2000:]
    plain_qemu = run_tool(
        "qemu-io", "-f", "raw", "-c", "read 0 4k", f"nbd://127.0.0.1:{d.nbd_port}/vol0", check=False
    )
    assert plain_qemu.returncode != 0 or "read 4096/4096" not in plain_qemu.stdout

    # TLS without a client certificate: the handshake fails (the server demands one signed by its CA).
    no_cert = pki.dir.parent / "ca-only"
    no_cert.mkdir()
    shutil.copy(pki.ca_cert, no_cert / "ca-cert.pem")
    refused = run_tool("nbdinfo", "--size", f"{d.nbd_url}/vol0?tls-certificates={no_cert}", check=False)
    assert refused.returncode != 0
    # The server is still serving TLS clients.
    assert int(run_tool("nbdinfo", "--size", uri).stdout) == 1024**3
    assert "Traceback" not in d.log_text() and "nbd-internal-error" not in d.log_text()


def test_allowed_tls_serves_both(tmp_path: Path, pki: Pki) -> None:
    d = start_daemon(tmp_path, config=_config(pki, "allowed"))
    try:
        assert d.nbd_url is not None and d.nbd_url.startswith("nbd://")
        port = d.nbd_port
        assert int(run_tool("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/vol0").stdout) == 1024**3
        uri = f"nbds://127.0.0.1:{port}/vol0?tls-certificates={pki.dir}"
        assert int(run_tool("nbdinfo", "--size", uri).stdout) == 1024**3
        run_tool("qemu-io", *_qemu_tls(pki, port, "vol0"), "-c", "write -P 0x33 0 4k")
        read = run_tool("qemu-io", "-f", "raw", "-c", "read -P 0x33 0 4k", f"nbd://127.0.0.1:{port}/vol0")
        assert "read 4096/4096" in read.stdout
    finally:
        assert d.stop() == 0, d.log_tail()
