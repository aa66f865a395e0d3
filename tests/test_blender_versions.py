"""Blender versions: a scene saved by 5.0 goes only to nodes with a 5.0.x build, unless
the artist allows any (`tessera submit --any-blender`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli.main import build_parser
from app.cli.options import job_options_of
from app.job_spec import job_spec_for
from common.blender_versions import blender_series, offers_series
from coordinator.farm import Principal
from protocol.models import LeaseRequest, Role
from renderers.scene_info import inspect_scene
from renderers.worker import RenderWorker
from tests.coordinator_tools import FreshFarm
from tests.inprocess_farm import CAPS, setup_farm, small_spec


@pytest.mark.parametrize(
    ("version", "series"),
    [("5.0.1", "5.0"), ("5.0", "5.0"), ("4.2.3 LTS", "4.2"), ("10.11.0", "10.11"), ("x", None)],
)
def test_blender_series(version: str, series: str | None) -> None:
    assert blender_series(version) == series


def test_offers_series() -> None:
    assert offers_series("5.0", ["4.2.3", "5.0.1"])
    assert not offers_series("5.0", ["4.2.3"])
    assert not offers_series("5.0", ["5.1.0"]), "a newer series is another series"
    assert offers_series("5.0.1", ["5.0.0"]), "a job naming a full version wants its series"
    assert offers_series("5.0", []), "a node that reported no build is not refused"


def test_a_job_records_the_series_that_saved_the_scene(
    worker: RenderWorker, demo_scene: Path
) -> None:
    info = inspect_scene(worker, demo_scene)
    assert blender_series(info.file_version) == "5.0", "the demo scene is saved by bpy 5.0.1"
    assert job_spec_for(info).blender_version == "5.0"
    parser = build_parser()
    args = parser.parse_args(["submit", str(demo_scene), "--any-blender"])
    assert job_spec_for(info, job_options_of(args)).blender_version is None
    args = parser.parse_args(["submit", str(demo_scene)])
    assert job_spec_for(info, job_options_of(args)).blender_version == "5.0"


def test_a_5_0_scene_is_leased_only_to_a_node_offering_5_0_unless_allowed(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm()
    spec = small_spec().model_copy(update={"blender_version": "5.0"})
    job_id, (a, _) = setup_farm(farm, spec, demo_scene, tmp_path)
    farm.create_account("old", Role.PROVIDER)
    old = Principal("old", Role.PROVIDER)
    caps = CAPS.model_copy(update={"name": "old", "price": 1.0, "blender_versions": ["4.2.3"]})
    old_node = farm.register_node(old, caps).node_id
    assert farm.try_lease(old, old_node, LeaseRequest(wait=0)) is None, "4.2 must not render 5.0"
    lease = farm.try_lease(Principal("a", Role.PROVIDER), a, LeaseRequest(wait=0))
    assert lease is not None and lease.task.job_id == job_id, "a 5.0.1 node renders it"
    anyone = small_spec().model_copy(update={"blender_version": None})
    other = fresh_farm()
    setup_farm(other, anyone, demo_scene, tmp_path / "any")
    other.create_account("old", Role.PROVIDER)
    old_node = other.register_node(old, caps).node_id
    assert other.try_lease(old, old_node, LeaseRequest(wait=0)) is not None, "allowed: any"
