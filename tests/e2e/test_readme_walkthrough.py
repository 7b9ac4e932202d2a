"""The README's walk-through, followed literally (issue 16): the shell blocks of "Five minutes
with thinblock" and "Pointing qemu-img, qemu-io and nbdinfo at a volume", line by line, against
a daemon started as ``make serve`` starts it (defaults: four sparse 64 GiB PDs, pool
``default``, ``vol0``).  Only the addresses change (free ports instead of 10809 and 8080) and
the first line (the daemon, started by the test).  Each line must succeed, and what its
comment promises must show: a quoted error in its output, the allocation `vv list` shows."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import THINBLOCK_SCRIPT, start_daemon

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
SECTIONS = ("## Five minutes with thinblock", "## Pointing qemu-img, qemu-io and nbdinfo at a volume")


def _section_lines(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    section = text[start : end if end >= 0 else len(text)]
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines += [line for line in block.splitlines() if line.strip()]
    return lines


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "daemon")
    work = tmp_path / "work"  # where the reader types: files the lines create land here
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(THINBLOCK_SCRIPT).parent}:{os.environ.get('PATH', '')}",
        "THINBLOCK_API": daemon.api_url,
    }
    ran = []
    try:
        for heading in SECTIONS:
            lines = _section_lines(heading)
            assert lines, heading
            for line in lines:
                if line.startswith(("make serve", "source .venv/bin/activate")):
                    continue  # the daemon runs; the PATH has the venv's thinblock
                command = line.replace("127.0.0.1:10809", f"127.0.0.1:{daemon.nbd_port}").replace(
                    "http://127.0.0.1:8080", daemon.api_url
                )
                result = subprocess.run(
                    ["bash", "-o", "pipefail", "-c", command],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    stdin=subprocess.DEVNULL,
                )
                output = result.stdout + result.stderr
                ran.append(line)
                promised = re.search(r'# "([^"]+)"', line)  # a quoted error the line must show
                if promised:
                    assert promised[1] in output, f"{line}\n{output}"
                    continue
                assert result.returncode == 0, f"{line}\nexited {result.returncode}:\n{output}"
                assert "Pattern verification failed" not in output and "error" not in output.lower(), (
                    f"{line}\n{output}"
                )
                if line.startswith("thinblock vv list") and "48 MiB allocated" in line:
                    assert re.search(r"db1\s.*48 MiB", result.stdout), result.stdout
                if line.startswith("thinblock vv set db1 --alloc-limit 50%"):
                    # "the same write now succeeds"
                    again = subprocess.run(
                        ["qemu-io", "-f", "raw", "-c", "write -P 0xef 200M 32M", daemon.uri("db1")],
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                    assert "wrote 33554432/33554432" in again.stdout, again.stdout + again.stderr
        assert len(ran) > 20
        # The addresses the prose gives (API base, OpenAPI document, Swagger UI, metrics) answer.
        prose = README.read_text()
        named = set(re.findall(r"`(http://127\.0\.0\.1:8080[^`\s]*)`", prose))
        named |= {"http://127.0.0.1:8080" + p for p in re.findall(r"at `(/[a-z0-9/._]+)`", prose)}
        assert {"http://127.0.0.1:8080/api/v1/openapi.json", "http://127.0.0.1:8080/docs"} <= named, named
        with daemon.http() as http:
            for url in sorted(named):
                path = url.removeprefix("http://127.0.0.1:8080") or "/"
                if path == "/api/v1":
                    path = "/api/v1/status"  # the base itself is no resource; a resource under it
                assert http.get(path).status_code == 200, url
        # Errors in the log are the alerts the walk-through raises on purpose (the limit), nothing else.
        assert [r for r in daemon.bad_log_records() if r.get("event") != "alert"] == []
    finally:
        assert daemon.stop() == 0
