"""Test certificates made with the openssl CLI: a CA, a server certificate for 127.0.0.1 and
localhost, and client certificates, in the directory layout GnuTLS clients (qemu's
``tls-creds-x509 dir=``, libnbd's ``tls-certificates=``) expect::

    ca-cert.pem  server-cert.pem  server-key.pem  client-cert.pem  client-key.pem

Throw-away ECDSA P-256 keys (RSA key generation takes seconds on a busy machine) in a test's temporary directory, valid for two days.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}-key.pem",
        "-out", f"{name}.csr", "-subj", subject, cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-days", "2", "-sha256", "-out", f"{name}-cert.pem",
        "-extfile", f"{name}.ext", cwd=directory,
    )  # fmt: skip
    (directory / f"{name}-key.pem").chmod(0o600)


def make_pki(directory: Path, *, client_cn: str = "client-a") -> Pki:
    """A CA, a server certificate and a client certificate (subject CN=``client_cn``)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed (Debian package openssl, in the Makefile's APT_PKGS)")
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
        "-days", "2", "-sha256", "-subj", "/CN=thinblock test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _issue(
        directory,
        "server",
        "/CN=localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n",
    )
    _issue(
        directory,
        "client",
        f"/O=thinblock tests/CN={client_cn}",
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
        "basicConstraints=critical,CA:FALSE\n",
    )
    return Pki(
        dir=directory,
        ca_cert=directory / "ca-cert.pem",
        ca_key=directory / "ca-key.pem",
        server_cert=directory / "server-cert.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client-cert.pem",
        client_key=directory / "client-key.pem",
    )
