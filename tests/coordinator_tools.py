"""The coordinator tests' one way to set up a farm: `fresh_farm(**config)` builds an
in-process `Farm` on a new SQLite database and content store under the test's temporary
folder (CoordinatorConfig's fields as keyword arguments) and closes it after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.db import Database
from coordinator.events import EventBus
from coordinator.farm import Farm
from coordinator.store import ContentStore

FreshFarm = Callable[..., Farm]


def open_farm(data_dir: Path, **config: Any) -> Farm:
    """A farm on `data_dir` (not started: no assembler, no sweeper)."""
    settings = CoordinatorConfig(data_dir=data_dir, **config)
    return Farm(settings, Database(settings.db_path), ContentStore(settings.store_dir), EventBus())


@pytest.fixture()
def fresh_farm(tmp_path: Path) -> Iterator[FreshFarm]:
    farms: list[Farm] = []

    def make(**config: Any) -> Farm:
        name = "coordinator" if not farms else f"coordinator-{len(farms)}"
        farm = open_farm(tmp_path / name, **config)
        farms.append(farm)
        return farm

    yield make
    for farm in farms:
        farm.db.close()
