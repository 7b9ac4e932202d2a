"""bench/node_pair.py's report: every configuration and profile, and the ratios the issue's
targets are about, computed from the figures (not the other way round)."""

from __future__ import annotations

from bench.fio import FioResult
from bench.node_pair import CONFIGS, PROFILES, markdown


def test_the_report_has_every_run_and_the_target_ratios() -> None:
    mib = 2**20
    speed = {"write-through": 10.0, "write-back": 20.0, "mirrored write-back": 15.0}
    results = {
        kind: {name: (FioResult(speed[kind] * mib, speed[kind] * 256, 100.0, 1), "") for name in PROFILES}
        for kind in CONFIGS
    }
    text = markdown(results, runtime=4, size=256 * mib)
    for kind in CONFIGS:
        for name in PROFILES:
            assert f"| {kind} | {name} | {speed[kind]:.1f} |" in text
    assert "* randwrite-4k: mirrored / write-back 0.75, mirrored / write-through 1.50" in text
    assert "* seqwrite-fresh: mirrored / write-back 0.75, mirrored / write-through 1.50" in text
