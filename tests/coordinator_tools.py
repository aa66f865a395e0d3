"""The coordinator tests' one way to set up a farm: `fresh_farm(**config)` builds an
in-process `Farm` on a new database (SQLite, or PostgreSQL: see `tests.postgres_tools`)
and content store under the test's temporary folder (CoordinatorConfig's fields as
keyword arguments) and closes it after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.db import open_database
from coordinator.events import EventBus
from coordinator.farm import Farm
from coordinator.store import ContentStore

FreshFarm = Callable[..., Farm]


def open_farm(data_dir: Path, **config: Any) -> Farm:
    """A farm on `data_dir` (not started: no assembler, no sweeper); `db_url=` picks
    another database than the SQLite file in `data_dir`."""
    settings = CoordinatorConfig(data_dir=data_dir, **config)
    db = open_database(settings.db_url, settings.db_path)
    return Farm(settings, db, ContentStore(settings.store_dir), EventBus())


@pytest.fixture()
def fresh_farm(
    tmp_path: Path, db_engine: str, request: pytest.FixtureRequest
) -> Iterator[FreshFarm]:
    farms: list[Farm] = []

    def make(**config: Any) -> Farm:
        name = "coordinator" if not farms else f"coordinator-{len(farms)}"
        if db_engine != "sqlite" and "db_url" not in config:
            config["db_url"] = request.getfixturevalue("postgres").new_database()
        farm = open_farm(tmp_path / name, **config)
        farms.append(farm)
        return farm

    yield make
    for farm in farms:
        farm.db.close()
