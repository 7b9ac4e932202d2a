"""The benchmark's own logic on fixed fio output: parsing, medians, ratios, targets, tables,
the server cost figures (CPU time per GiB, peak RSS), the options.

The fixtures are fio's real stdout (``fio: connected to NBD server`` lines, then JSON), captured
once by running bench.fio's command lines against ``nbdkit null`` with a 1 s runtime.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bench.fio import PROFILES, FioError, FioResult, fio_command, parse_fio_json, profile_by_name
from bench.metadata_scale import _count_items, _find_vv_list_path, measure_million
from bench.report import (
    Cell,
    Results,
    ServerCost,
    Summary,
    results_table,
    verdict,
    write_through_twin,
)
from bench.run import parse_args
from bench.servers import (
    DEFAULT_SERVER_KEYS,
    parse_peak_rss,
    parse_proc_stat_cpu,
    process_cpu_seconds,
    process_peak_rss,
)

FIXTURES = Path(__file__).parent / "fixtures"
RANDRW_1CONN = (FIXTURES / "fio-randrw-64k-1conn.stdout.txt").read_text()
RANDREAD_4CONN = (FIXTURES / "fio-randread-4k-4conn.stdout.txt").read_text()


def result(mib_s: float, iops: float = 1.0, p99_us: float = 100.0) -> FioResult:
    return FioResult(bw_bytes=mib_s * 2**20, iops=iops, p99_us=p99_us, io_bytes=1)


# --- fio command lines and output -----------------------------------------------------------------


def test_profiles_are_those_of_fio_profiles_sh_in_order() -> None:
    assert [(p.name, p.rw, p.block_size, p.iodepth, p.time_based) for p in PROFILES] == [
        ("seqwrite-fresh", "write", "1M", 8, False),
        ("seqread", "read", "1M", 8, False),
        ("randwrite-4k", "randwrite", "4k", 16, True),
        ("randread-4k", "randread", "4k", 16, True),
        ("randrw-64k", "randrw", "64k", 8, True),
    ]


def test_one_connection_command_is_the_shell_scripts() -> None:
    uri = "nbd://127.0.0.1:10901/vol"
    assert fio_command(profile_by_name("seqwrite-fresh"), uri, size="1G", runtime=8) == [
        "fio", "--name=seqwrite-fresh", "--ioengine=nbd", f"--uri={uri}", "--size=1G", "--rw=write",
        "--bs=1M", "--iodepth=8", "--output-format=json",
    ]  # fmt: skip
    assert fio_command(profile_by_name("randread-4k"), uri, size="1G", runtime=8)[-3:] == [
        "--runtime=8",
        "--time_based",
        "--output-format=json",
    ]


def test_four_connections_add_jobs_grouped_on_separate_slices() -> None:
    cmd = fio_command(profile_by_name("seqwrite-fresh"), "nbd://h/", size="1G", runtime=8, connections=4)
    assert cmd[-4:] == ["--numjobs=4", "--group_reporting", "--offset_increment=1G", "--output-format=json"]


def test_parse_mixed_profile_reports_read_and_write_together() -> None:
    parsed = parse_fio_json(RANDRW_1CONN, "randrw")
    # The "mixed" section of the fixture, not its read half (1085174025 B/s, p99 659456 ns).
    assert parsed == FioResult(bw_bytes=2170675404.0, iops=33121.878122, p99_us=806.912, io_bytes=2172846080)
    assert parsed.mib_s == pytest.approx(2070.117, abs=0.001)


def test_parse_group_reported_four_connections() -> None:
    parsed = parse_fio_json(RANDREAD_4CONN, "randread")
    assert parsed == FioResult(bw_bytes=312673596.0, iops=76336.327345, p99_us=6193.152, io_bytes=313298944)


def test_parse_write_profile_reads_the_write_side() -> None:
    document = json.loads(RANDREAD_4CONN[RANDREAD_4CONN.index("{") :])
    job = document["jobs"][0]
    job["write"], job["read"] = job["read"], job["write"]
    assert parse_fio_json(json.dumps(document), "randwrite").iops == pytest.approx(76336.327345)


def test_parse_refuses_what_is_not_one_good_job() -> None:
    document = json.loads(RANDREAD_4CONN[RANDREAD_4CONN.index("{") :])
    with pytest.raises(FioError, match="no JSON"):
        parse_fio_json("fio: connected to NBD server\nfio: pid=1, err=5/file:io_u.c\n", "read")
    with pytest.raises(FioError, match="one \\(group-reported\\) job"):
        parse_fio_json(json.dumps({**document, "jobs": document["jobs"] * 2}), "randread")
    document["jobs"][0]["error"] = 5
    with pytest.raises(FioError, match="error 5"):
        parse_fio_json(json.dumps(document), "randread")
    with pytest.raises(FioError, match="mixed"):
        parse_fio_json(RANDREAD_4CONN, "randrw")


# --- medians, ratios, targets, the table -------------------------------------------------------------


def test_summary_takes_each_figures_own_median() -> None:
    summary = Summary.of(
        [result(100, iops=30, p99_us=900), result(300, iops=10, p99_us=100), result(200, 20, 500)]
    )
    assert (summary.runs, summary.mib_s, summary.iops, summary.p99_us) == (3, 200, 20, 500)
    assert summary.spread == pytest.approx(1.0)  # (300 - 100) / 200
    with pytest.raises(ValueError):
        Summary.of([])


def sample_results() -> Results:
    servers = [
        "thinblock-raid0",
        "thinblock-raid1",
        "thinblock-raid1-wb",
        "qemu-nbd",
        "nbdkit-file",
        "nbdkit-null",
    ]
    results = Results(servers, ["seqread", "randread-4k"], [1])

    def runs(profile: str, server: str, *mibs: float, p99_us: float = 100.0) -> None:
        for mib in mibs:
            results.add(Cell(1, profile, server), result(mib, p99_us=p99_us))

    runs("seqread", "qemu-nbd", 90, 100, 110)
    runs("seqread", "nbdkit-file", 150, 160, 170)  # the best file-backed peer on seqread
    runs("seqread", "nbdkit-null", 200, 200, 200)
    runs("seqread", "thinblock-raid0", 170, 180, 175)
    runs("seqread", "thinblock-raid1", 140, 150, 160)
    runs("seqread", "thinblock-raid1-wb", 160, 150, 140)  # run by run: 1.14, 1.0, 0.875 of raid1
    runs("randread-4k", "qemu-nbd", 40, 50, 60)  # the best peer on randread-4k (nbdkit-file failed)
    runs("randread-4k", "nbdkit-null", 50, 50, 50)
    runs("randread-4k", "thinblock-raid0", 45, 45, 45)
    runs("randread-4k", "thinblock-raid1-wb", 50, 50, 50)
    results.fail(Cell(1, "randread-4k", "nbdkit-file"), "fio exited 1")
    results.fail(Cell(1, "randread-4k", "thinblock-raid1"), "did not start:\n  boom | bang")
    return results


def test_ratios_are_medians_over_the_best_file_peer_and_over_null() -> None:
    results = sample_results()
    assert results.best_peer(1, "seqread") == "nbdkit-file"
    assert results.best_peer(1, "randread-4k") == "qemu-nbd"  # the only file peer that ran
    assert results.peer_ratio(Cell(1, "seqread", "thinblock-raid0")) == pytest.approx(175 / 160)
    assert results.peer_ratio(Cell(1, "seqread", "qemu-nbd")) == pytest.approx(100 / 160)
    assert results.ceiling_ratio(Cell(1, "seqread", "thinblock-raid1")) == pytest.approx(0.75)
    assert results.peer_ratio(Cell(1, "randread-4k", "thinblock-raid0")) == pytest.approx(0.9)
    assert results.peer_ratio(Cell(1, "randread-4k", "thinblock-raid1")) is None
    none_ran = Results(["thinblock-raid0", "nbdkit-null"], ["seqread"], [1])
    none_ran.add(Cell(1, "seqread", "thinblock-raid0"), result(10))
    assert none_ran.best_peer(1, "seqread") is None
    assert none_ran.peer_ratio(Cell(1, "seqread", "thinblock-raid0")) is None


def test_write_back_is_compared_with_its_write_through_twin_run_by_run() -> None:
    assert write_through_twin("thinblock-raid1-wb") == "thinblock-raid1"
    assert write_through_twin("thinblock-raid0-wb-direct") == "thinblock-raid0-direct"
    assert write_through_twin("thinblock-raid0") is None and write_through_twin("qemu-nbd") is None
    results = sample_results()
    ratio, pairs = results.twin_ratio(Cell(1, "seqread", "thinblock-raid1-wb"))
    assert ratio == pytest.approx(1.0)
    assert pairs == pytest.approx((160 / 140, 1.0, 140 / 160))
    # Its twin did not run: not measured, and said so.
    (check,) = results.checks(Cell(1, "randread-4k", "thinblock-raid1-wb"))
    assert (check.name, check.ratio, check.met) == ("write-through", None, False)
    (check,) = results.checks(Cell(1, "seqread", "thinblock-raid1-wb"))
    assert check.met and check.describe() == "write-through 1.00 met (>= 1.0), runs 0.88-1.14"


def test_target_misses_name_each_check_below_its_target() -> None:
    misses = {(c.profile, c.server, check.name): check.ratio for c, check in sample_results().target_misses()}
    assert misses == {
        ("seqread", "thinblock-raid1", "best peer"): pytest.approx(150 / 160),
        ("seqread", "thinblock-raid1", "null"): pytest.approx(0.75),
        ("randread-4k", "thinblock-raid0", "best peer"): pytest.approx(0.9),
        ("randread-4k", "thinblock-raid1", "best peer"): None,
        ("randread-4k", "thinblock-raid1", "null"): None,
        ("randread-4k", "thinblock-raid1-wb", "write-through"): None,
    }
    # Met: raid0 seqread against both (1.09 of nbdkit-file, 0.875 of null), raid0 randread vs null (0.9).
    checks = sample_results().checks(Cell(1, "seqread", "thinblock-raid0"))
    assert [(c.name, c.against, c.target, c.met) for c in checks] == [
        ("best peer", "nbdkit-file", 1.0, True),
        ("null", "nbdkit-null", 0.8, True),
    ]
    assert sample_results().checks(Cell(1, "seqread", "qemu-nbd")) == []
    assert verdict(1.25, 1.0) == "1.25 met (>= 1.0)"
    assert verdict(0.9, 1.0) == "0.90 MISSED by 10% (< 1.0)"
    assert verdict(None, 0.8) == "not measured"


def test_cpu_per_gib_and_peak_rss_summarised_per_cell() -> None:
    results = Results(["thinblock-raid0"], ["seqread"], [1])
    cell = Cell(1, "seqread", "thinblock-raid0")
    for cpu, moved, peak in (
        (1.0, 2 * 2**30, 100 * 2**20),
        (3.0, 2**30, 300 * 2**20),
        (0.5, 2**30, 200 * 2**20),
    ):
        fio = FioResult(bw_bytes=2**30, iops=1, p99_us=1, io_bytes=moved)
        results.add(cell, fio, ServerCost(cpu_seconds=cpu, peak_rss_bytes=peak))
    summary = results.summary(cell)
    assert summary is not None
    assert summary.cpu_s_per_gib == pytest.approx(0.5)  # median of 0.5, 3.0, 0.5
    assert summary.peak_rss_bytes == 300 * 2**20
    # A run without its cost (unreadable /proc): no figure rather than a wrong one.
    results.add(cell, FioResult(bw_bytes=2**30, iops=1, p99_us=1, io_bytes=2**30))
    summary = results.summary(cell)
    assert summary is not None and summary.cpu_s_per_gib is None and summary.peak_rss_bytes is None


def test_proc_parsing_of_cpu_time_and_peak_rss() -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    # A command name with spaces and parentheses, as /proc shows it.
    stat = f"1234 (thin (x) y) S 1 1234 1234 0 -1 4194560 500 0 0 0 {3 * ticks} {ticks} 0 0 20 0 5 0 99"
    assert parse_proc_stat_cpu(stat) == pytest.approx(4.0)
    status = "Name:\tpython\nVmPeak:\t 900 kB\nVmHWM:\t  51200 kB\nVmRSS:\t 40000 kB\n"
    assert parse_peak_rss(status) == 50 * 2**20
    with pytest.raises(ValueError):
        parse_peak_rss("Name:\tkthread\n")
    # This process, read the same way the harness reads a server's.
    assert (process_cpu_seconds(os.getpid()) or 0) > 0
    assert (process_peak_rss(os.getpid()) or 0) > 2**20


def test_markdown_table_has_one_row_per_cell_with_medians_ratios_and_targets() -> None:
    lines = results_table(sample_results()).markdown().splitlines()
    assert lines[0].startswith("| conns | profile | server | MiB/s | IOPS | p99 us | spread | CPU s/GiB |")
    assert lines[1].count("---:") == 8
    assert len(lines) == 2 + 2 * 6
    raid0 = next(line for line in lines if "| seqread | thinblock-raid0 |" in line)
    assert raid0 == (
        "| 1 | seqread | thinblock-raid0 | 175.0 | 1 | 100 | 6% | - | - | 1.09 | 0.88 | "
        "best peer 1.09 met (>= 1.0); null 0.88 met (>= 0.8) |"
    )
    assert "| 1 | seqread | nbdkit-file | 160.0 | 1 | 100 | 12% | - | - | 1.00 | 0.80 |  |" in lines
    failed = next(line for line in lines if "randread-4k | thinblock-raid1 |" in line)
    # The message stays on its row, its pipe escaped.
    assert "FAILED" in failed and failed.endswith("| did not start: boom \\| bang |")


def test_quick_mode_and_server_selection() -> None:
    quick = parse_args(["--quick"])
    assert (quick.repeat, quick.runtime, quick.size) == (1, 1, "64M")
    assert quick.servers == list(DEFAULT_SERVER_KEYS)
    assert not any(key.endswith("-direct") for key in quick.servers)
    assert {"thinblock-raid0-wb", "thinblock-raid1-wb", "nbdkit-null"} <= set(quick.servers)
    direct = parse_args(["--servers", "thinblock-raid1", "peers", "--direct-io"])
    assert direct.servers == [
        "thinblock-raid1",
        "thinblock-raid0-direct",
        "thinblock-raid1-direct",
        "thinblock-raid0-wb-direct",
        "thinblock-raid1-wb-direct",
        "qemu-nbd",
        "nbdkit-file",
        "nbdkit-null",
    ]
    full = parse_args([])
    assert (full.repeat, full.runtime, full.size) == (3, 8, "1G")


# --- metadata scale: finding the VV listing in the daemon's API -------------------------------------


def test_vv_listing_route_and_count() -> None:
    openapi = {
        "paths": {"/api/v1/vvs/{name}": {"get": {}}, "/api/v1/vvs": {"get": {}, "post": {}}, "/pools": {}}
    }
    assert _find_vv_list_path(openapi) == "/api/v1/vvs"
    with pytest.raises(RuntimeError):
        _find_vv_list_path({"paths": {"/pools": {"get": {}}}})
    assert _count_items([{}, {}, {}]) == 3
    assert _count_items({"vvs": [{}, {}], "total": 2}) == 2
    with pytest.raises(RuntimeError):
        _count_items({"total": 2})


async def test_store_option_never_deletes_a_directory_the_benchmark_did_not_build(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="holds no benchmark store"):
        await measure_million(tmp_path / "scratch", 10, store=tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
