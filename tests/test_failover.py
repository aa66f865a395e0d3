"""Clients and nodes given several coordinator replicas ("URL1,URL2") fail over: a
replica that cannot be reached is skipped under the usual retry rules, and the next
serves the following requests. Bad lists are refused naming the bad URL."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.connection import coordinator_url
from common.errors import CoordinatorUnreachableError, UsageError
from common.settings import Settings
from farm_node.config import loopback_url
from protocol.client import TesseraClient, split_urls
from tests.farm_tools import RunningCoordinator, start_coordinator


def _dead_url() -> str:
    """A URL on this machine where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    running = start_coordinator(tmp_path / "coordinator")
    yield running
    running.stop()


def test_a_client_fails_over_to_the_replica_that_answers(
    coordinator: RunningCoordinator,
) -> None:
    dead = _dead_url()
    with TesseraClient(f"{dead},{coordinator.url}/", coordinator.admin_token, backoff=0.01) as c:
        assert c.base_url == dead
        assert c.me().account == "admin"
        assert c.base_url == coordinator.url  # and it stays there
        assert c.health().status == "ok"
    lost = TesseraClient(f"{dead},{_dead_url()}", retries=3, backoff=0.01)
    with lost, pytest.raises(CoordinatorUnreachableError, match=dead):
        lost.health()


def test_several_urls_are_checked_one_by_one(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert coordinator_url("http://a:1/, http://b:2", settings) == "http://a:1,http://b:2"
    with pytest.raises(UsageError, match="'ftp://b' is not a coordinator URL"):
        coordinator_url("http://a:1,ftp://b", settings)
    assert split_urls("http://a, ,http://b/") == ["http://a", "http://b"]
    assert loopback_url("http://127.0.0.1:1,http://localhost:2")
    assert not loopback_url("http://127.0.0.1:1,http://farm.example:2")
