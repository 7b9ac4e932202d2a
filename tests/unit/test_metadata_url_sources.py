"""Where the metadata store's URL comes from (issue 11 item 2): ``--metadata``, the environment's
``THINBLOCK_METADATA`` and the config file's ``metadata`` key, in that order, each tried with
``thinblock check`` against a PostgreSQL store that holds one PD (the data directory given
holds no store: a check that read it would count none)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.support.stores import StoreBackend
from thinblock.cli import main
from thinblock.config import ConfigError, parse_config
from thinblock.metadata import open_store
from thinblock.units import MiB


def _check(argv: list[str]) -> dict[str, object]:
    out, err = io.StringIO(), io.StringIO()
    main(["check", "--json", *argv], stdout=out, stderr=err)
    assert out.getvalue(), err.getvalue()
    result: dict[str, object] = json.loads(out.getvalue())
    return result


@pytest.fixture
def one_pd_store(postgresql_backend: StoreBackend) -> StoreBackend:
    # The URL sources are the same for every backend; PostgreSQL is the one a URL names.
    store = postgresql_backend.open()
    store.add_pd("/dev/thinblock-test-pd", 64 * MiB, 16 * MiB)
    store.close()
    return postgresql_backend


def test_the_environment_names_the_store(
    one_pd_store: StoreBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THINBLOCK_METADATA", one_pd_store.url)
    report = _check(["--data", str(tmp_path)])
    assert report["counts"]["pds"] == 1  # type: ignore[index]


def test_the_config_file_names_the_store_and_the_environment_and_flag_come_first(
    one_pd_store: StoreBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THINBLOCK_METADATA", raising=False)
    config = tmp_path / "thinblock.toml"
    config.write_text(f'data_dir = "{tmp_path}"\nmetadata = "{one_pd_store.url}"\n')
    assert _check(["--config", str(config)])["counts"]["pds"] == 1  # type: ignore[index]
    empty = tmp_path / "empty"
    empty.mkdir()
    open_store(f"sqlite:{empty}").close()
    # The environment, then the flag, over the file: an empty SQLite store counts no PD.
    monkeypatch.setenv("THINBLOCK_METADATA", f"sqlite:{empty}")
    assert _check(["--config", str(config)])["counts"]["pds"] == 0  # type: ignore[index]
    monkeypatch.setenv("THINBLOCK_METADATA", "sqlite:/nonexistent-thinblock-dir")
    assert _check(["--config", str(config), "--metadata", one_pd_store.url])["counts"]["pds"] == 1  # type: ignore[index]


def test_a_config_key_that_is_not_a_store_url_names_the_key() -> None:
    assert parse_config({"metadata": "postgresql://u@h/db"}).metadata == "postgresql://u@h/db"
    with pytest.raises(ConfigError, match="metadata"):
        parse_config({"metadata": "mysql://u@h/db"})
