"""Less fixed overhead for `tessera render` (issue 16, part 3), checked by what happens,
never by how long it took:

- a stopping node ends its open long poll at once: the coordinator answers it "no task"
  (`POST /nodes/{id}/stop-polling`), so a node whose poll would last 20 s stops long
  before that; only the node's owner may end its poll;
- `tessera render --nodes 1` starts the farm while the scene is prepared, keeps the
  nodes' benchmark score where the next run finds it, reports when each step ended,
  and still writes frames equal to Blender's own render.

The timings themselves are measured in benchmarks/bench_render_overhead.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import ApiError
from farm_node.bundle_cache import BundleCache
from farm_node.config import NodeConfig
from farm_node.daemon import NodeDaemon
from farm_node.runner import TaskRunner
from protocol.client import TesseraClient
from protocol.models import LeaseRequest, NodeCapabilities, Role
from renderers.builds import BlenderBuild
from renderers.exr import read_exr
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.worker import RenderWorker
from tests.farm_tools import REPO, RunningCoordinator, start_coordinator

#: The coordinator's longest poll (its default): a node that waited it out would take
#: this long to stop; every bound below is well under it.
POLL_SECONDS = 20.0


@pytest.fixture()
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    running = start_coordinator(tmp_path / "coordinator")
    yield running
    running.stop()


def _provider(coordinator: RunningCoordinator, name: str) -> str:
    with coordinator.client(coordinator.admin_token) as admin:
        return admin.create_account(name, Role.PROVIDER).token


def _capabilities(name: str) -> NodeCapabilities:
    return NodeCapabilities(name=name, cpu="test", cpu_threads=1, ram_mib=1024)


def test_stop_polling_ends_an_open_long_poll_with_no_task(
    coordinator: RunningCoordinator,
) -> None:
    token = _provider(coordinator, "alice")
    with coordinator.client(token) as node, coordinator.client(token) as waker:
        node_id = node.register_node(_capabilities("n1")).node_id
        answers: list[object] = []
        poll = threading.Thread(
            target=lambda: answers.append(node.lease(node_id, LeaseRequest(wait=POLL_SECONDS)))
        )
        poll.start()
        # Whether the poll is open yet or not, it ends: the request stays until answered.
        waker.stop_polling(node_id)
        poll.join(timeout=POLL_SECONDS / 2)
        assert not poll.is_alive(), "the long poll was not ended by stop-polling"
        assert answers == [None]
        # Answered once: the node's next poll waits for work as before (a short wait here).
        assert node.lease(node_id, LeaseRequest(wait=0.2)) is None


def test_an_open_long_poll_ends_when_its_token_is_revoked(
    coordinator: RunningCoordinator,
) -> None:
    """The poll sleeps on the coordinator's event bus; a revocation wakes it."""
    token = _provider(coordinator, "alice")
    with coordinator.client(token) as node, coordinator.client(coordinator.admin_token) as admin:
        node_id = node.register_node(_capabilities("n1")).node_id
        errors: list[BaseException] = []

        def poll() -> None:
            try:
                node.lease(node_id, LeaseRequest(wait=POLL_SECONDS))
            except BaseException as exc:
                errors.append(exc)

        waiting = threading.Thread(target=poll)
        waiting.start()
        threading.Event().wait(0.5)  # the poll is open (or opens refused: both end it)
        admin.revoke_account("alice")
        waiting.join(timeout=POLL_SECONDS / 2)
        assert not waiting.is_alive(), "the revoked token's long poll went on"
        assert len(errors) == 1 and isinstance(errors[0], ApiError)
        assert errors[0].status == 401


def test_only_the_nodes_owner_may_end_its_poll(coordinator: RunningCoordinator) -> None:
    alice, mallory = _provider(coordinator, "alice"), _provider(coordinator, "mallory")
    with coordinator.client(alice) as owner, coordinator.client(mallory) as stranger:
        node_id = owner.register_node(_capabilities("n1")).node_id
        with pytest.raises(ApiError) as refused:
            stranger.stop_polling(node_id)
        assert refused.value.status == 403
        with pytest.raises(ApiError) as unknown:
            owner.stop_polling("0123456789ab")
        assert unknown.value.status == 404


def test_a_stopping_idle_node_stops_without_waiting_out_its_poll(
    coordinator: RunningCoordinator, bpy_build: BlenderBuild, tmp_path: Path
) -> None:
    token = _provider(coordinator, "alice")
    config = NodeConfig(
        coordinator_url=coordinator.url,
        data_dir=tmp_path / "node",
        token=token,
        name="idle-node",
        poll_wait=60.0,  # the coordinator's poll timeout (20 s) bounds it
        benchmark=False,
    )
    client = TesseraClient(coordinator.url, token)
    runner = TaskRunner(bpy_build, config.scratch_dir)
    daemon = NodeDaemon(config, client, runner, BundleCache(config.cache_dir, 1 << 30))
    stop = threading.Event()
    serving = threading.Thread(target=daemon.run, args=(stop,))
    serving.start()
    try:
        with coordinator.client(token) as watcher:
            for _ in range(600):
                if any(n.capabilities.name == "idle-node" for n in watcher.nodes()):
                    break
                threading.Event().wait(0.05)
            else:
                pytest.fail("the node did not register")
        stop.set()
        serving.join(timeout=POLL_SECONDS / 2)
        assert not serving.is_alive(), "the idle node waited out its long poll"
    finally:
        stop.set()
        serving.join()
        client.close()
    assert runner.worker_starts == 0, "an idle CPU node without a benchmark starts no Blender"


def test_node_benchmark_cache_option_moves_the_score_file(tmp_path: Path) -> None:
    plain = NodeConfig(coordinator_url="http://127.0.0.1:1", data_dir=tmp_path / "node")
    assert plain.benchmark_file == tmp_path / "node" / "benchmark.json"
    kept = NodeConfig(
        coordinator_url="http://127.0.0.1:1",
        data_dir=tmp_path / "node",
        benchmark_cache=tmp_path / "lasting" / "score.json",
    )
    assert kept.benchmark_file == tmp_path / "lasting" / "score.json"


def test_render_prepares_while_the_farm_starts_and_frames_equal_blenders(
    demo_scene: Path, worker: RenderWorker, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TESSERA_HOME"] = str(home)
    argv = [sys.executable, "-m", "app.cli", "render", str(demo_scene), "--nodes", "1"]
    argv += ["--threads-per-node", "1", "--frames", "2-3", "--percentage", "10"]
    argv += ["--samples", "4", "--no-denoise", "--out", str(tmp_path / "out"), "--json"]
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "completed" and summary["frames_written"] == [2, 3]
    # A farm of this machine's own honest nodes needs no probe (see the next test).
    assert summary["probed"] is False
    assert summary["cost"]["final"] > 0 and summary["ledger_ok"]
    steps = summary["timings"]
    # Every step is reported, in the order the command takes them; preparing the scene
    # did not wait for the farm (it may finish before the nodes register, or after).
    order = ["coordinator_listening", "nodes_registered", "farm_started", "submitted"]
    order += ["first_frame", "job_done", "stopping", "stopped"]
    assert [steps[name] for name in order] == sorted(steps[name] for name in order)
    assert steps["farm_started"] >= max(steps["prepared"], steps["nodes_registered"])
    # The nodes' benchmark score is kept for the next run (one file per thread count).
    cache = home / "local-farm" / "benchmark-1-threads.json"
    assert cache.exists() and json.loads(cache.read_text())
    for frame in (2, 3):
        farm_frame = read_exr(tmp_path / "out" / "demo" / f"frame_{frame:04d}.exr")
        local = tmp_path / f"local{frame}.exr"
        render_frame_local(
            worker,
            demo_scene,
            local,
            LocalRenderOptions(frame=frame, percentage=10, samples=4, denoise=False, preview=False),
        )
        reference = read_exr(local)
        for name in ("R", "G", "B", "A"):
            channel = f"ViewLayer.Combined.{name}"
            assert np.array_equal(farm_frame.channel(channel), reference.channel(channel)), (
                frame,
                channel,
            )


def test_a_local_farm_probes_only_when_previews_or_fixed_costs_are_needed() -> None:
    from app.cli.local import local_probe_needed
    from app.cli.main import build_parser

    def needed(*options: str) -> bool:
        args = build_parser().parse_args(["render", "scene.blend", *options])
        cheats = ["noise"] * args.cheaters
        return local_probe_needed(args, cheats)

    assert not needed()
    assert not needed("--tiles", "2x2", "--nodes", "3")
    assert needed("--cheaters", "1")  # previews are how the coordinator refuses black tiles
    assert needed("--tiles", "auto")  # the probe weighs each render's fixed cost
    assert needed("--probe")


def test_the_bpy_build_is_remembered_until_its_install_changes(tmp_path: Path) -> None:
    from app.blender_choice import BPY_CACHE, choose_build
    from common.settings import Settings
    from farm_node.config import NodeConfig
    from farm_node.main import select_build
    from renderers.bpy_memo import remembered_bpy
    from renderers.builds import clear_probe_cache

    settings = Settings(home=tmp_path / "home")
    cache = settings.home / BPY_CACHE
    assert remembered_bpy(cache) is None  # nothing known yet
    clear_probe_cache()
    probed = choose_build(None, settings)
    assert probed.kind == "bpy"
    assert remembered_bpy(cache) == probed  # the next command skips the probe
    record = json.loads(cache.read_text())
    # What the next command gets is what the file says, for this very install, and a
    # node given the file (`tessera node` passes $TESSERA_HOME's) starts without a probe...
    record["build_hash"] = "remembered"
    cache.write_text(json.dumps(record))
    assert choose_build(None, settings).build_hash == "remembered"
    node = NodeConfig(
        coordinator_url="http://127.0.0.1:1", token="t", data_dir=tmp_path / "node", bpy_memo=cache
    )
    assert select_build(node).build_hash == "remembered"
    # ...and nothing once the install looks different (a reinstall changes its module).
    record["identity"]["size"] += 1
    cache.write_text(json.dumps(record))
    assert remembered_bpy(cache) is None
    assert choose_build(None, settings) == probed
    assert select_build(node) == probed
    cache.write_text("{not json")
    assert remembered_bpy(cache) is None
