"""LAN mode over zeroconf, bound to 127.0.0.1 only (multicast elsewhere is off-limits):
coordinators and nodes are found, and only a node that knows the secret may join."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ApiError
from protocol.client import TesseraClient
from protocol.discovery import Advertisement, browse, find_coordinator, node_info
from protocol.models import LeaseRequest, NodeCapabilities, Role
from tests.farm_tools import REPO, RunningCoordinator, start_coordinator

LOOPBACK = "127.0.0.1"


@pytest.fixture()
def farm() -> str:
    """A farm name of this test's own, so no other farm on the machine can answer."""
    return f"studio-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def lan_coordinator(tmp_path: Path, farm: str) -> Iterator[RunningCoordinator]:
    running = start_coordinator(
        tmp_path / "lan", "--lan", "--farm", farm, "--secret", "s3cret", "--interface", LOOPBACK
    )
    yield running
    running.stop()


def test_node_finds_the_coordinator_and_joins_with_the_secret(
    lan_coordinator: RunningCoordinator, farm: str
) -> None:
    found = find_coordinator(farm, "s3cret", interface=LOOPBACK, timeout=10)
    assert found is not None
    assert found.url == lan_coordinator.url
    assert found.properties["farm"] == farm
    assert "s3cret" not in str(found.properties), "the secret is never advertised"
    with TesseraClient(found.url) as anonymous:
        token = anonymous.join_lan_farm("render-box", "s3cret")
    assert token.role is Role.PROVIDER and token.account == "lan-render-box"
    with TesseraClient(found.url, token.token) as node:
        registration = node.register_node(NodeCapabilities(name="render-box"))
        assert node.lease(registration.node_id, LeaseRequest(wait=0)) is None


def test_an_artist_joins_as_a_requester_and_can_submit_but_not_provide(
    lan_coordinator: RunningCoordinator,
) -> None:
    with TesseraClient(lan_coordinator.url) as anonymous:
        artist = anonymous.join_lan_farm("anna", "s3cret", role=Role.REQUESTER)
        node = anonymous.join_lan_farm("anna", "s3cret")  # same machine, also a node
    assert (artist.role, artist.account) == (Role.REQUESTER, "lan-user-anna")
    assert (node.role, node.account) == (Role.PROVIDER, "lan-anna")
    with TesseraClient(lan_coordinator.url, artist.token) as client:
        assert client.me().role is Role.REQUESTER
        assert client.jobs() == []
        with pytest.raises(ApiError) as refused:
            client.register_node(NodeCapabilities(name="anna"))
        assert refused.value.status == 403


def test_joining_as_an_admin_is_refused(lan_coordinator: RunningCoordinator) -> None:
    import requests

    challenge = requests.get(f"{lan_coordinator.url}/api/v1/join/challenge", timeout=10).json()
    from protocol.discovery import join_proof

    body = {
        "name": "mallory",
        "nonce": challenge["nonce"],
        "proof": join_proof("s3cret", challenge["nonce"], "mallory"),
        "role": "admin",
    }
    answer = requests.post(f"{lan_coordinator.url}/api/v1/join", json=body, timeout=10)
    assert answer.status_code == 422, answer.text
    with TesseraClient(lan_coordinator.url) as anonymous, pytest.raises(Exception, match="admin"):
        anonymous.join_lan_farm("mallory", "s3cret", role=Role.ADMIN)


def test_tessera_join_saves_a_requester_token(
    lan_coordinator: RunningCoordinator, farm: str, tmp_path: Path
) -> None:
    env = {"TESSERA_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "app.cli", "join", "--farm", farm, "--interface", LOOPBACK]
    joined = subprocess.run(
        [*argv, "--secret", "s3cret", "--name", "ben", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert joined.returncode == 0, joined.stderr
    answer = json.loads(joined.stdout)
    assert answer["url"] == lan_coordinator.url and answer["account"] == "lan-user-ben"
    token_file = tmp_path / "home" / "token"
    assert token_file.read_text().strip() == answer["token"]
    assert token_file.stat().st_mode & 0o777 == 0o600
    no_secret = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert no_secret.returncode == 2 and "--secret" in no_secret.stderr


def test_wrong_secret_or_farm_is_not_found_and_cannot_join(
    lan_coordinator: RunningCoordinator, farm: str
) -> None:
    assert find_coordinator(farm, "guess", interface=LOOPBACK, timeout=2) is None
    assert find_coordinator(farm + "-other", "s3cret", interface=LOOPBACK, timeout=2) is None
    with TesseraClient(lan_coordinator.url) as anonymous:
        with pytest.raises(ApiError, match="Wrong farm secret") as caught:
            anonymous.join_lan_farm("intruder", "guess")
        assert caught.value.status == 401


def test_a_coordinator_without_lan_refuses_joins(tmp_path: Path) -> None:
    plain = start_coordinator(tmp_path / "plain")
    try:
        with TesseraClient(plain.url) as anonymous, pytest.raises(ApiError) as caught:
            anonymous.join_lan_farm("node", "anything")
        assert caught.value.status == 404
        assert "--lan" in caught.value.hint
    finally:
        plain.stop()


def test_nodes_advertise_their_hardware() -> None:
    info = node_info(
        "gpu-box", LOOPBACK, {"devices": "CPU,OPTIX", "threads": 32, "blender": "5.0.1"}
    )
    with Advertisement(info, LOOPBACK):
        seen = browse(
            ("node",),
            interface=LOOPBACK,
            seconds=5,
            until=lambda items: any(i.name == "gpu-box" for i in items),
        )
    node = next(item for item in seen if item.name == "gpu-box")
    assert node.properties["devices"] == "CPU,OPTIX"
    assert node.properties["blender"] == "5.0.1"


def test_tessera_nodes_lan_lists_what_is_advertised(
    lan_coordinator: RunningCoordinator, farm: str
) -> None:
    info = node_info("idle-box", LOOPBACK, {"devices": "CPU", "threads": 4})
    with Advertisement(info, LOOPBACK):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "nodes",
                "--lan",
                "--interface",
                LOOPBACK,
                "--seconds",
                "4",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    seen = {(item["kind"], item["name"]) for item in json.loads(done.stdout)}
    assert ("node", "idle-box") in seen
    assert any(kind == "coordinator" and farm in name for kind, name in seen)
