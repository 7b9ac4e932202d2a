"""contrib/thinblock.service: a unit systemd accepts, hardened, starting a command thinblock takes."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import THINBLOCK_SCRIPT
from thinblock.cli import build_parser

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "thinblock.service"
INSTALLED_AT = "/usr/local/bin/thinblock"
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian's systemd package has it); the unit is not verified",
)


def _settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def _installed_copy(tmp_path: Path) -> Path:
    """The unit as installed: ExecStart must name an executable that exists for verify, so the
    venv's thinblock stands in for /usr/local/bin/thinblock."""
    text = UNIT.read_text()
    assert INSTALLED_AT in text
    copy = tmp_path / "thinblock.service"
    copy.write_text(text.replace(INSTALLED_AT, THINBLOCK_SCRIPT))
    return copy


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on settings it ignores, printing why: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_the_unit_is_hardened(tmp_path: Path) -> None:
    settings = _settings()
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DynamicUser": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert settings.get(key) == [value], key
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for thinblock.service: ([\d.]+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    # systemd's scale: 0 (all locked down) to 10 (unprotected); below 2 is its "OK" band.
    assert float(found[1]) < 2.0 and found[2] == "OK", found[0]


def test_execstart_is_a_command_thinblock_takes() -> None:
    (exec_start,) = _settings()["ExecStart"]
    argv = shlex.split(exec_start.replace("$THINBLOCK_OPTS", ""))
    assert argv[0] == INSTALLED_AT
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.data) == ("serve", "/var/lib/thinblock")
    # The data directory is the one systemd creates and lets the service write.
    assert _settings()["StateDirectory"] == ["thinblock"]
