"""A node starts its confined Blender before the lease comes (issue 16, the first frame).

`TaskRunner.prestart` starts Blender in the background, its sandbox showing an empty
slot folder; a lease for a new bundle links the bundle into the slot and renders there,
with no Blender start on the task's path. These tests check that the first lease is
served by that process, that a scene in a slot still reads nothing outside its bundle
(the hostile scenes of tests/confinement_scenes.py), that two bundles never share a
slot, that the frames equal those of a node without pre-start, and that a stopped node
leaves no Blender behind.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import BundleError, ExternalPathError
from farm_node.bundle_cache import BundleCache
from farm_node.config import NodeConfig
from farm_node.daemon import NodeDaemon
from farm_node.errors import UnsafeBundleError
from farm_node.runner import TaskRunner
from farm_node.slots import fill_slot, make_slot
from protocol.client import TesseraClient
from protocol.models import Lease, TaskKind
from protocol.output import FINISH_MANIFEST, FinishManifest
from renderers.builds import BlenderBuild
from renderers.exr import read_exr
from renderers.scene_info import inspect_scene
from renderers.worker import RenderLimits, RenderWorker, find_bwrap
from tests.confinement_scenes import build_scenes
from tests.farm_tools import (
    RunningCoordinator,
    job_spec,
    make_bundle,
    start_coordinator,
    wait_for_job,
)
from tests.test_node_runner import make_lease

needs_bwrap = pytest.mark.skipif(
    find_bwrap() is None and not os.environ.get("CI"), reason="bubblewrap is not usable here"
)
SANDBOXES = ("off", pytest.param("bwrap", marks=needs_bwrap))
SHA_A, SHA_B = "a" * 64, "b" * 64


def _bundle(folder: Path, scene: Path, extra: str) -> Path:
    """A bundle folder as the cache extracts it: the scene and a file of its own in a
    sub-folder (so that linking handles folders too)."""
    (folder / "notes").mkdir(parents=True)
    shutil.copyfile(scene, folder / "demo.blend")
    (folder / "notes" / f"{extra}.txt").write_text(extra)
    return folder / "demo.blend"


def _ready(runner: TaskRunner) -> int:
    """Wait for the pre-started Blender; its pid."""
    deadline = time.monotonic() + 120
    while (pid := runner.prestarted_pid) is None:
        assert time.monotonic() < deadline, "the pre-started Blender never came up"
        time.sleep(0.05)
    return pid


def _slots(scratch: Path) -> list[Path]:
    return sorted(p for p in scratch.iterdir() if p.name.startswith("slot-"))


def _same_pixels(one: Path, two: Path) -> None:
    first, second = read_exr(one), read_exr(two)
    assert first.channel_names() == second.channel_names()
    for name in first.channel_names():
        assert np.array_equal(first.channel(name), second.channel(name)), name


def _sandbox_sees(pid: int, path: Path) -> bool:
    return (Path(f"/proc/{pid}/root") / str(path.absolute()).lstrip("/")).exists()


# --- the slot, without Blender ---------------------------------------------------------


def test_a_slot_gets_hard_links_and_takes_one_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "textures" / "wood").mkdir(parents=True)
    (bundle / "scene.blend").write_bytes(b"blend")
    (bundle / "textures" / "wood" / "a.png").write_bytes(b"png")
    slot = make_slot(tmp_path / "scratch" / "slot-1")
    fill_slot(slot, bundle)
    linked = slot / "textures" / "wood" / "a.png"
    assert linked.read_bytes() == b"png" and not linked.is_symlink()
    assert linked.stat().st_ino == (bundle / "textures" / "wood" / "a.png").stat().st_ino
    with pytest.raises(BundleError, match="already holds a bundle"):
        fill_slot(slot, bundle)
    assert make_slot(slot) == slot and not any(slot.iterdir()), "a leftover slot is emptied"


def test_a_bundle_with_a_symlink_never_reaches_a_slot(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (tmp_path / "secret.png").write_bytes(b"secret")
    (bundle / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(UnsafeBundleError, match="symbolic link"):
        fill_slot(make_slot(tmp_path / "slot"), bundle)
    assert not (tmp_path / "slot" / "link.png").exists()


# --- the runner -------------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_the_first_lease_of_a_bundle_is_served_by_the_prestarted_blender(
    bpy_build: BlenderBuild, demo_scene: Path, tmp_path: Path, sandbox: str
) -> None:
    scene = _bundle(tmp_path / "bundles" / SHA_A, demo_scene, "a")
    scratch = tmp_path / "scratch"
    limits = RenderLimits(sandbox=sandbox)
    with TaskRunner(bpy_build, scratch, limits=limits) as runner:
        assert runner.prestart()
        assert not runner.prestart(), "one pre-started Blender at a time"
        pid = _ready(runner)
        assert runner.worker_starts == 1
        runner.render(make_lease(SHA_A), scene, tmp_path / "first.exr")
        assert runner.worker_starts == 1, "the lease started no Blender"
        assert runner.worker_pids() == [pid], "the pre-started process rendered it"
        assert runner.prestarted_pid is None and runner.warm_bundles() == [SHA_A]
        (slot,) = _slots(scratch)
        assert (slot / "demo.blend").stat().st_ino == scene.stat().st_ino, "hard links"
        assert (slot / "notes" / "a.txt").read_text() == "a"
        if sandbox == "bwrap":
            assert _sandbox_sees(pid, slot / "demo.blend")
            assert not _sandbox_sees(pid, scene), "the cache's folder is not shown"
        runner.render(make_lease(SHA_A, lease_id="two"), scene, tmp_path / "second.exr")
        assert runner.worker_pids() == [pid] and runner.worker_starts == 1
    assert not _slots(scratch), "closing the runner deletes the slots"
    assert _gone(pid)
    with TaskRunner(bpy_build, tmp_path / "plain", limits=limits) as plain:
        plain.render(make_lease(SHA_A), scene, tmp_path / "plain.exr")
    _same_pixels(tmp_path / "first.exr", tmp_path / "plain.exr")


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_a_finish_of_the_bundle_uses_the_same_slot_and_blender(
    bpy_build: BlenderBuild, demo_scene: Path, tmp_path: Path
) -> None:
    """A finish lease names the bundle's cached scene, as a render lease does: it runs on
    the bundle's warm worker, from its slot, with no restart (the view is the same)."""
    scene = _bundle(tmp_path / "bundles" / SHA_A, demo_scene, "a")
    with TaskRunner(bpy_build, tmp_path / "scratch") as runner:
        runner.prestart()
        pid = _ready(runner)
        merged = runner.render(make_lease(SHA_A), scene, tmp_path / "merged.exr").output
        finish = make_lease(
            SHA_A, lease_id="fin", kind=TaskKind.FINISH, with_assignment=False
        ).model_copy(update={"percentage": 10})  # make_lease renders 10 % of the scene
        packed = runner.finish(finish, scene, merged, tmp_path / "finished.zip")
        assert runner.worker_pids() == [pid] and runner.worker_starts == 1
    with zipfile.ZipFile(packed) as archive:
        manifest = FinishManifest.model_validate_json(archive.read(FINISH_MANIFEST))
        assert [entry.kind for entry in manifest.files] == ["frame"]
        assert archive.read(manifest.files[0].path)


@needs_bwrap
def test_two_bundles_get_two_slots_and_the_second_cannot_see_the_first(
    bpy_build: BlenderBuild, demo_scene: Path, tmp_path: Path
) -> None:
    scene_a = _bundle(tmp_path / "bundles" / SHA_A, demo_scene, "a")
    scene_b = _bundle(tmp_path / "bundles" / SHA_B, demo_scene, "b")
    scratch = tmp_path / "scratch"
    with TaskRunner(bpy_build, scratch, limits=RenderLimits(sandbox="bwrap")) as runner:
        runner.prestart()
        pid_a = _ready(runner)
        runner.render(make_lease(SHA_A), scene_a, tmp_path / "a.exr")
        (slot_a,) = _slots(scratch)
        assert runner.prestart(), "the slot worker was taken: another one starts"
        pid_b = _ready(runner)
        runner.render(make_lease(SHA_B, lease_id="b"), scene_b, tmp_path / "b.exr")
        (slot_b,) = [slot for slot in _slots(scratch) if slot != slot_a]
        assert runner.worker_pids() == [pid_a, pid_b] and runner.worker_starts == 2
        assert sorted(p.name for p in (slot_b / "notes").iterdir()) == ["b.txt"]
        assert (slot_a / "notes" / "a.txt").exists(), "slot A still holds bundle A only"
        assert not (slot_a / "notes" / "b.txt").exists()
        assert _sandbox_sees(pid_b, slot_b / "notes" / "b.txt")
        for hidden in (slot_a, scene_a, scene_b):
            assert not _sandbox_sees(pid_b, hidden), f"{hidden} is shown to bundle B"
        assert not _sandbox_sees(pid_a, slot_b)
    _same_pixels(tmp_path / "a.exr", tmp_path / "b.exr")


def test_a_retired_worker_takes_its_slot_with_it(
    bpy_build: BlenderBuild, demo_scene: Path, tmp_path: Path
) -> None:
    scene_a = _bundle(tmp_path / "bundles" / SHA_A, demo_scene, "a")
    scene_b = _bundle(tmp_path / "bundles" / SHA_B, demo_scene, "b")
    scratch = tmp_path / "scratch"
    with TaskRunner(bpy_build, scratch, max_warm=1) as runner:
        runner.prestart()
        _ready(runner)
        runner.render(make_lease(SHA_A), scene_a, tmp_path / "a.exr")
        (slot_a,) = _slots(scratch)
        runner.render(make_lease(SHA_B, lease_id="b"), scene_b, tmp_path / "b.exr")
        assert runner.warm_bundles() == [SHA_B]
        assert not slot_a.exists(), "bundle A's worker was retired with its slot"
        assert runner.worker_starts == 1, "bundle B (no pre-started one) started its own"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hostile scenes' root: provider/ (the secrets) and bundle/ (less its symlink,
    which never gets out of a bundle cache)."""
    root = tmp_path_factory.mktemp("hostile")
    build_scenes(root)
    (root / "bundle" / "textures" / "link.png").unlink()
    (root / "bundle" / "shots" / "symlink.blend").unlink()
    return root


def _hostile_lease(attack: str, sha: str) -> Lease:
    return make_lease(sha, lease_id=attack).model_copy(
        update={"scene_path": f"shots/{attack}.blend"}
    )


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_scene_in_a_slot_still_cannot_read_outside_its_bundle(
    bpy_build: BlenderBuild, hostile: Path, tmp_path: Path, sandbox: str
) -> None:
    """Every attack is refused on the slot's paths. The slots sit in the hostile root
    (scratch = root), so `//../../provider/secret.png` from a slot's shots/ names the
    real secret, as it does from the bundle."""
    scratch = hostile
    limits = RenderLimits(sandbox=sandbox)
    with TaskRunner(bpy_build, scratch, limits=limits, max_warm=4) as runner:
        for index, attack in enumerate(("absolute", "relative", "library", "sequence")):
            runner.prestart()
            _ready(runner)
            starts = runner.worker_starts
            out = tmp_path / f"{attack}.exr"
            lease = _hostile_lease(attack, f"{index:x}" * 64)
            with pytest.raises(ExternalPathError, match="outside the scene's bundle"):
                runner.render(lease, hostile / "bundle" / "shots" / f"{attack}.blend", out)
            assert not out.exists()
            assert runner.worker_starts == starts, "refused on the slot's paths, no restart"


@needs_bwrap
def test_the_slot_sandbox_alone_shows_no_file_outside_the_bundle(
    bpy_build: BlenderBuild, hostile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both path checks off: in its slot, Blender simply cannot see the provider's files
    (the relative attack's target exists: the slots sit beside provider/)."""

    def view_only(
        self: RenderWorker, scene: Path, root: Path | None, message: dict[str, object]
    ) -> object:
        message["confine_to"] = None
        return None if root is None else (root.absolute(),)

    monkeypatch.setattr(RenderWorker, "_confine", view_only)
    scratch = hostile
    with TaskRunner(bpy_build, scratch, limits=RenderLimits(sandbox="bwrap")) as runner:
        runner.prestart()
        pid = _ready(runner)
        for attack in ("absolute", "relative", "sequence"):
            lease = _hostile_lease(attack, SHA_A)
            scene = hostile / "bundle" / "shots" / f"{attack}.blend"
            out = runner.render(lease, scene, tmp_path / f"{attack}.exr").output
            part = read_exr(out).parts[0]
            rgb = {n.rsplit(".", 1)[-1]: float(np.mean(v)) for n, v in part.channels.items()}
            assert rgb["G"] < 0.1 and rgb["R"] > 0.9, f"{attack}: pink, not the secret"
        assert runner.worker_pids() == [pid] and runner.worker_starts == 1
        (slot,) = _slots(scratch)
        assert (slot / ".." / "provider" / "secret.png").resolve().exists()
        assert not _sandbox_sees(pid, hostile / "provider")
        assert _sandbox_sees(pid, slot / "shots" / "relative.blend")


# --- the node ---------------------------------------------------------------------------


@pytest.fixture()
def farm(tmp_path: Path) -> Iterator[tuple[RunningCoordinator, str, str]]:
    coordinator = start_coordinator(tmp_path / "coordinator", "--heartbeat-interval", "1")
    try:
        with coordinator.client(coordinator.admin_token) as admin:
            provider = admin.create_account("provider", "provider").token
            requester = admin.create_account("requester", "requester").token
        yield coordinator, provider, requester
    finally:
        coordinator.stop()


def test_a_ready_node_serves_its_first_lease_with_the_prestarted_blender(
    bpy_build: BlenderBuild,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
    farm: tuple[RunningCoordinator, str, str],
) -> None:
    coordinator, provider, requester = farm
    info = inspect_scene(worker, demo_scene)
    bundle, sha = make_bundle(demo_scene, tmp_path / "bundle")
    config = NodeConfig(
        coordinator_url=coordinator.url,
        data_dir=tmp_path / "node",
        token=provider,
        name="prestarting-node",
        poll_wait=0.5,
        benchmark=False,
        retry_initial=0.1,
        retry_max=1.0,
    )
    node_client = TesseraClient(config.coordinator_url, provider)
    runner = TaskRunner(bpy_build, config.scratch_dir, task_timeout=120)
    daemon = NodeDaemon(config, node_client, runner, BundleCache(config.cache_dir, 1 << 30))
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(stop,), name="prestarting-node")
    thread.start()
    try:
        pid = _ready(runner)
        assert runner.worker_starts == 1
        with coordinator.client(requester) as client:
            client.upload_bundle(bundle)
            job = client.submit_job(job_spec(info, sha, frames="1-2", tiles=(1, 1)))
            assert wait_for_job(client, job.id, timeout=120) == "completed"
        assert runner.warm_bundles() == [sha]
        assert runner.worker_pids()[0] == pid, "the pre-started Blender took the bundle"
        pids = runner.worker_pids()
    finally:
        stop.set()
        thread.join(60)
        node_client.close()
    assert not thread.is_alive()
    for gone in pids:
        assert _gone(gone), f"Blender {gone} outlived the node"
    assert not _slots(config.scratch_dir), "the stopped node left no slot"
