"""The benchmark's own logic on fixed fio output: parsing, medians, ratios, targets, tables.

The fixtures are fio's real stdout (``fio: connected to NBD server`` lines, then JSON), captured
once by running bench.fio's command lines against ``nbdkit null`` with a 1 s runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench.fio import PROFILES, FioError, FioResult, fio_command, parse_fio_json, profile_by_name
from bench.metadata_scale import _count_items, _find_vv_list_path, measure_million
from bench.report import Cell, Results, Summary, results_table, verdict

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
    results = Results(["thinblock-raid0", "thinblock-raid1", "qemu-nbd"], ["seqread", "randread-4k"], [1])
    for mib in (90, 100, 110):
        results.add(Cell(1, "seqread", "qemu-nbd"), result(mib, p99_us=200))
    for mib in (120, 130, 125):
        results.add(Cell(1, "seqread", "thinblock-raid0"), result(mib, p99_us=100))
    for mib in (70, 75, 80):
        results.add(Cell(1, "seqread", "thinblock-raid1"), result(mib, p99_us=400))
    for mib in (40, 50, 60):
        results.add(Cell(1, "randread-4k", "qemu-nbd"), result(mib))
    for mib in (45, 45, 45):
        results.add(Cell(1, "randread-4k", "thinblock-raid0"), result(mib))
    results.fail(Cell(1, "randread-4k", "thinblock-raid1"), "did not start:\n  boom | bang")
    return results


def test_ratio_is_median_over_qemu_nbd_median_of_the_same_profile() -> None:
    results = sample_results()
    assert results.ratio(Cell(1, "seqread", "thinblock-raid0")) == pytest.approx(1.25)
    assert results.ratio(Cell(1, "seqread", "thinblock-raid1")) == pytest.approx(0.75)
    assert results.ratio(Cell(1, "randread-4k", "thinblock-raid0")) == pytest.approx(0.9)
    assert results.ratio(Cell(1, "randread-4k", "thinblock-raid1")) is None
    assert results.p99_ratio(Cell(1, "seqread", "thinblock-raid0")) == pytest.approx(0.5)


def test_target_misses_name_each_profile_below_its_target() -> None:
    misses = {(c.profile, c.server): (t, r) for c, t, r in sample_results().target_misses()}
    assert misses.keys() == {
        ("seqread", "thinblock-raid1"),
        ("randread-4k", "thinblock-raid0"),
        ("randread-4k", "thinblock-raid1"),
    }
    assert misses["seqread", "thinblock-raid1"] == (0.8, pytest.approx(0.75))
    assert misses["randread-4k", "thinblock-raid1"] == (0.8, None)
    assert verdict(1.25, 1.0) == "met (>= 1.0)"
    assert verdict(0.9, 1.0) == "MISSED by 10% (< 1.0)"
    assert verdict(None, 0.8) == "not measured"


def test_markdown_table_has_one_row_per_cell_with_medians_and_ratios() -> None:
    lines = results_table(sample_results()).markdown().splitlines()
    assert lines[0].startswith("| conns | profile | server | MiB/s | IOPS | p99 us |")
    assert lines[1].count("---:") == 6
    assert len(lines) == 2 + 2 * 3
    assert "| 1 | seqread | thinblock-raid0 | 125.0 | 1 | 100 | 8% | 1.25 | 0.50 | met (>= 1.0) |" in lines
    assert "| 1 | seqread | qemu-nbd | 100.0 | 1 | 200 | 20% | 1.00 | 1.00 |  |" in lines
    failed = next(line for line in lines if "randread-4k | thinblock-raid1" in line)
    # The message stays on its row, its pipe escaped.
    assert "FAILED" in failed and failed.endswith("| did not start: boom \\| bang |")


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
