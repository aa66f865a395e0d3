"""Jobs matched to the hardware they need, and pools (issue 14, the coordinator's half).

A real coordinator process on 127.0.0.1 with real SQLite; nodes are the tests' minimal
loop (`serve_leases`) rendering with a real Blender worker, or bare lease requests where
only the scheduling decision matters. Node capabilities are declared, as a node would.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from app.cli.main import main
from app.job_spec import MEMORY_MARGIN, job_options, job_spec_for
from common.errors import ApiError, UsageError
from protocol.models import GpuInfo, LeaseRequest, NodeCapabilities, Role
from protocol.requirements import JobRequirements, gb_to_mib
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.scene_memory import MemoryModel
from renderers.scene_probe import SceneProbe
from renderers.worker import RenderWorker
from tests.farm_tools import (
    REPO,
    RunningCoordinator,
    job_spec,
    make_bundle,
    serve_leases,
    start_coordinator,
    wait_for_job,
)

NO_WAIT = LeaseRequest(wait=0)


@pytest.fixture()
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    running = start_coordinator(tmp_path / "coordinator", "--lease-seconds", "30")
    yield running
    running.stop()


@pytest.fixture()
def tokens(coordinator: RunningCoordinator) -> dict[str, str]:
    """studio: a requester that owns pool 'studio'; bob: a provider added to it; carol: a
    provider that is not; dave: another requester, not in the pool."""
    with coordinator.client(coordinator.admin_token) as admin:
        tokens = {
            "studio": admin.create_account("studio", Role.REQUESTER).token,
            "bob": admin.create_account("bob", Role.PROVIDER).token,
            "carol": admin.create_account("carol", Role.PROVIDER).token,
            "dave": admin.create_account("dave", Role.REQUESTER).token,
        }
    with coordinator.client(tokens["studio"]) as studio:
        studio.create_pool("studio")
        studio.add_to_pool("studio", "bob")
    return tokens


@pytest.fixture(scope="module")
def demo_info(worker: RenderWorker, demo_scene: Path) -> SceneInfo:
    return inspect_scene(worker, demo_scene)


@pytest.fixture()
def bundle(demo_scene: Path, tmp_path: Path) -> tuple[Path, str]:
    return make_bundle(demo_scene, tmp_path / "bundle")


def _gpu_node(
    name: str, vram_gb: float, ram_gb: float = 64, gpu: str = "RTX A4000"
) -> NodeCapabilities:
    return NodeCapabilities(
        name=name,
        devices=["CPU", "OPTIX"],
        gpus=[GpuInfo(type="OPTIX", name=f"NVIDIA {gpu}", vram_mib=gb_to_mib(vram_gb))],
        ram_mib=gb_to_mib(ram_gb),
        blender_versions=["5.0.1"],
    )


def test_a_pool_job_runs_only_on_the_pools_nodes(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    demo_scene: Path,
    bundle: tuple[Path, str],
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    path, sha = bundle
    pooled = JobRequirements(pool="studio")
    with (
        coordinator.client(tokens["studio"]) as studio,
        coordinator.client(tokens["bob"]) as bob,
        coordinator.client(tokens["carol"]) as carol,
    ):
        studio.upload_bundle(path)
        secret = studio.submit_job(job_spec(demo_info, sha, frames="1", requirements=pooled))
        public = studio.submit_job(job_spec(demo_info, sha, frames="1"))
        # carol's node claims the pool too: it is refused the pool, not the farm.
        claimed = carol.register_node(
            NodeCapabilities(name="carol-node", blender_versions=["5.0.1"], pools=["studio"])
        )
        assert len(claimed.notices) == 1
        assert "Pool 'studio' refused" in claimed.notices[0]
        assert "tessera pool add studio carol" in claimed.notices[0]
        # Only carol is connected: the pool job says why it waits.
        assert "pool 'studio'" in studio.job(secret.id).message
        # carol's node renders the public job and never the pool's.
        done = serve_leases(
            carol, worker, demo_scene, tmp_path / "carol", until_idle=2, pools=("studio",)
        )
        assert done >= 4  # its tiles (and a denoise task when the scene denoises)
        assert wait_for_job(studio, public.id) == "completed"
        assert all(t.status.value == "queued" for t in studio.tasks(secret.id))
        # bob's node is in the pool: it renders the pool job.
        done = serve_leases(
            bob, worker, demo_scene, tmp_path / "bob", until_idle=2, pools=("studio",)
        )
        assert done >= 4  # its tiles (and a denoise task when the scene denoises)
        assert wait_for_job(studio, secret.id) == "completed"
        nodes = {node.id: node.owner for node in bob.nodes()}
        assert {nodes[t.node] for t in studio.tasks(secret.id) if t.node} == {"bob"}
        # Taking bob out of the pool counts on his next request.
        studio.remove_from_pool("studio", "bob")
        again = studio.submit_job(job_spec(demo_info, sha, frames="1", requirements=pooled))
        node = bob.register_node(
            NodeCapabilities(name="bob-2", blender_versions=["5.0.1"], pools=["studio"])
        )
        assert bob.lease(node.node_id, NO_WAIT) is None
        assert "pool 'studio'" in studio.job(again.id).message


def test_a_job_needing_more_vram_than_any_node_has_waits_naming_vram(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    bundle: tuple[Path, str],
) -> None:
    path, sha = bundle
    needs = JobRequirements(min_vram_mib=gb_to_mib(24))
    with (
        coordinator.client(tokens["studio"]) as studio,
        coordinator.client(tokens["bob"]) as bob,
    ):
        studio.upload_bundle(path)
        small = bob.register_node(_gpu_node("small-gpu", vram_gb=16))
        job = studio.submit_job(
            job_spec(demo_info, sha, frames="1", tiles=(1, 1), device="OPTIX", requirements=needs)
        )
        spec = job_spec(
            demo_info, sha, frames="1", tiles=(1, 1), device="OPTIX", requirements=needs
        )
        assert "24.0 GB of VRAM" in studio.estimate_job(spec).warning
        # Submit warns: no registered node meets it; the job waits with the reason.
        assert "24.0 GB of VRAM" in job.warning and "16.0 GB" in job.warning
        assert job.status.value == "queued"
        message = studio.job(job.id).message
        assert "VRAM" in message and "24.0 GB" in message and "16.0 GB" in message
        assert bob.lease(small.node_id, NO_WAIT) is None
        # A CPU job asks no VRAM: the same requirement does not hold it back.
        cpu_job = studio.submit_job(
            job_spec(demo_info, sha, frames="1", tiles=(1, 1), requirements=needs)
        )
        assert cpu_job.warning == ""
        lease = bob.lease(small.node_id, NO_WAIT)
        assert lease is not None and lease.task.job_id == cpu_job.id
        bob.release(lease.lease_id)
        studio.cancel(cpu_job.id)
        # A node whose GPU has enough gets it.
        big = bob.register_node(_gpu_node("big-gpu", vram_gb=48))
        lease = bob.lease(big.node_id, NO_WAIT)
        assert lease is not None and lease.task.job_id == job.id and lease.device == "OPTIX"


def test_gpu_name_and_ram_requirements_are_enforced_and_named(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    bundle: tuple[Path, str],
) -> None:
    path, sha = bundle
    with (
        coordinator.client(tokens["studio"]) as studio,
        coordinator.client(tokens["bob"]) as bob,
    ):
        studio.upload_bundle(path)
        node = bob.register_node(_gpu_node("a4000", vram_gb=16, ram_gb=32))
        named = studio.submit_job(
            job_spec(
                demo_info,
                sha,
                frames="1",
                device="OPTIX",
                requirements=JobRequirements(gpu="rtx 4090"),
            )
        )
        assert "'rtx 4090'" in named.warning and "NVIDIA RTX A4000" in named.warning
        assert "GPU whose name contains 'rtx 4090'" in studio.job(named.id).message
        roomy = studio.submit_job(
            job_spec(
                demo_info, sha, frames="1", requirements=JobRequirements(min_ram_mib=gb_to_mib(128))
            )
        )
        assert "128.0 GB of RAM" in studio.job(roomy.id).message
        assert "32.0 GB" in studio.job(roomy.id).message
        assert bob.lease(node.node_id, NO_WAIT) is None
        # The name matches case-insensitively, as a part of the GPU's name.
        fitting = studio.submit_job(
            job_spec(
                demo_info,
                sha,
                frames="1",
                device="OPTIX",
                requirements=JobRequirements(gpu="a4000"),
            )
        )
        lease = bob.lease(node.node_id, NO_WAIT)
        assert lease is not None and lease.task.job_id == fitting.id


def test_a_node_that_reports_no_memory_figure_is_not_held_to_one(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    bundle: tuple[Path, str],
) -> None:
    """RAM 0 and VRAM None mean 'could not be read' (a machine without /proc/meminfo or
    NVML): such a node is leased the job, rather than locked out of every probed job."""
    path, sha = bundle
    needs = JobRequirements(min_vram_mib=gb_to_mib(24), min_ram_mib=gb_to_mib(128))
    with (
        coordinator.client(tokens["studio"]) as studio,
        coordinator.client(tokens["bob"]) as bob,
    ):
        studio.upload_bundle(path)
        node = bob.register_node(
            NodeCapabilities(
                name="unread",
                devices=["CPU", "OPTIX"],
                gpus=[GpuInfo(type="OPTIX", name="NVIDIA RTX A4000", vram_mib=None)],
                blender_versions=["5.0.1"],
            )
        )
        job = studio.submit_job(
            job_spec(demo_info, sha, frames="1", device="OPTIX", requirements=needs)
        )
        assert job.warning == ""
        lease = bob.lease(node.node_id, NO_WAIT)
        assert lease is not None and lease.task.job_id == job.id


def test_pools_are_managed_by_their_owner_only(
    coordinator: RunningCoordinator, tokens: dict[str, str]
) -> None:
    with (
        coordinator.client(tokens["studio"]) as studio,
        coordinator.client(tokens["dave"]) as dave,
        coordinator.client(tokens["bob"]) as bob,
        coordinator.client(coordinator.admin_token) as admin,
    ):
        with pytest.raises(ApiError, match="only its owner or an admin") as caught:
            bob.add_to_pool("studio", "carol")  # a member, not the owner
        assert caught.value.status == 403
        with pytest.raises(ApiError, match="No pool 'studio'") as caught:
            dave.add_to_pool("studio", "dave")  # a stranger is not told it exists
        assert caught.value.status == 404
        with pytest.raises(ApiError, match="No account 'nobody'") as caught:
            studio.add_to_pool("studio", "nobody")
        assert caught.value.status == 404
        with pytest.raises(ApiError, match="exists already") as caught:
            dave.create_pool("studio")
        assert caught.value.status == 409
        with pytest.raises(ApiError, match="not in pool") as caught:
            studio.remove_from_pool("studio", "carol")
        assert caught.value.status == 404
        assert admin.add_to_pool("studio", "carol").members == ["bob", "carol"]
        assert [p.name for p in bob.pools()] == ["studio"]
        assert bob.pools()[0].members == []  # members are the owner's to see
        assert dave.pools() == []


def test_a_job_in_a_pool_its_owner_may_not_use_is_refused(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    bundle: tuple[Path, str],
) -> None:
    path, sha = bundle
    with coordinator.client(tokens["dave"]) as dave:
        dave.upload_bundle(path)
        for pool in ("studio", "nowhere"):
            spec = job_spec(demo_info, sha, frames="1", requirements=JobRequirements(pool=pool))
            with pytest.raises(ApiError, match=f"No pool '{pool}'") as caught:
                dave.submit_job(spec)
            assert caught.value.status == 404
            with pytest.raises(ApiError, match=f"No pool '{pool}'"):
                dave.estimate_job(spec)
        assert dave.jobs() == []


def _post(
    coordinator: RunningCoordinator, token: str, path: str, body: object
) -> requests.Response:
    return requests.post(
        f"{coordinator.url}/api/v1{path}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ram_mib": 1 << 50}, "ram_mib"),
        ({"ram_mib": -1}, "ram_mib"),
        ({"gpus": [{"type": "CUDA", "name": "x", "vram_mib": 1 << 50}]}, "vram_mib"),
        ({"gpus": [{"type": "CUDA", "name": "x", "vram_mib": "lots"}]}, "vram_mib"),
        ({"gpus": [{"type": "CUDA", "name": "bad\x00name"}]}, "name"),
        ({"gpus": [{"type": "CUDA", "name": "x"}] * 65}, "gpus"),
        ({"pools": ["no spaces allowed"]}, "pools"),
        ({"pools": [f"p{i}" for i in range(33)]}, "pools"),
        ({"devices": ["CPU"] * 17}, "devices"),
    ],
)
def test_node_declarations_out_of_bounds_are_refused(
    coordinator: RunningCoordinator, tokens: dict[str, str], change: dict[str, object], field: str
) -> None:
    reply = _post(coordinator, tokens["bob"], "/nodes", {"name": "liar", **change})
    assert reply.status_code == 422, reply.text
    assert field in reply.text


def test_a_non_finite_ram_claim_is_refused(
    coordinator: RunningCoordinator, tokens: dict[str, str]
) -> None:
    reply = requests.post(
        f"{coordinator.url}/api/v1/nodes",
        data='{"name": "liar", "ram_mib": NaN}',
        headers={"Authorization": f"Bearer {tokens['bob']}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 422, reply.text


@pytest.mark.parametrize(
    ("requirements", "device", "expected"),
    [
        ({"min_vram_mib": -1}, "OPTIX", "min_vram_mib"),
        ({"min_ram_mib": 1 << 40}, "ANY", "min_ram_mib"),
        ({"gpu": "RTX"}, "ANY", "choose a GPU device"),
        ({"gpu": "RTX\n"}, "OPTIX", "gpu"),
        ({"pool": "two words"}, "ANY", "pool"),
        ({"colour": "red"}, "ANY", "colour"),
    ],
)
def test_bad_requirements_get_422_naming_them(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    requirements: dict[str, object],
    device: str,
    expected: str,
) -> None:
    spec = job_spec(demo_info, "0" * 64, frames="1").model_dump(mode="json")
    spec.update(device=device, requirements=requirements)
    reply = _post(coordinator, tokens["studio"], "/jobs", spec)
    assert reply.status_code == 422, reply.text
    assert expected in reply.text


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "../etc"])
def test_bad_pool_names_are_refused(
    coordinator: RunningCoordinator, tokens: dict[str, str], name: str
) -> None:
    reply = _post(coordinator, tokens["studio"], "/pools", {"name": name})
    assert reply.status_code == 422, reply.text
    assert "name" in reply.text


# --- the artist's side: options, defaults from the probe, the CLI ------------------------


def test_requirements_default_to_the_probes_peak_with_a_margin(demo_info: SceneInfo) -> None:
    mib = 1 << 20
    measured = SceneProbe(cost=1.0, previews=[], memory=MemoryModel(base=100 * mib, per_pixel=0))
    spec = job_spec_for(demo_info, job_options(device="OPTIX"), measured=measured)
    need = spec.requirements
    assert need.measured_peak_mib == 100
    assert need.min_vram_mib == need.min_ram_mib == math.ceil(100 * MEMORY_MARGIN)
    # The estimate is for the job's frame size: twice the pixels, more memory.
    grows = SceneProbe(cost=1.0, previews=[], memory=MemoryModel(base=0, per_pixel=64.0))
    small = job_spec_for(demo_info, job_options(percentage=50), measured=grows)
    large = job_spec_for(demo_info, job_options(percentage=100), measured=grows)
    assert large.requirements.min_vram_mib > 3 * small.requirements.min_vram_mib
    # The artist's numbers win; 0 asks for nothing; unprobed scenes ask nothing.
    mine = job_spec_for(
        demo_info, job_options(min_vram_gb=8, min_ram_gb=0, gpu="4090", device="GPU", pool="p")
    )
    assert mine.requirements == JobRequirements(
        min_vram_mib=gb_to_mib(8), min_ram_mib=0, gpu="4090", pool="p"
    )
    assert job_spec_for(demo_info).requirements == JobRequirements()


def test_a_gpu_name_on_a_cpu_job_is_a_usage_error(demo_info: SceneInfo) -> None:
    with pytest.raises(UsageError, match="choose a GPU device"):
        job_spec_for(demo_info, job_options(gpu="RTX 4090"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["submit", "x.blend", "--min-vram", "-1"], "--min-vram: -1 is not an amount of memory"),
        (["submit", "x.blend", "--min-vram", "nan"], "--min-vram: 'nan' is not a finite number"),
        (["submit", "x.blend", "--min-ram", "lots"], "--min-ram: 'lots' is not a number"),
        (["submit", "x.blend", "--min-ram", "1e9"], "--min-ram: 1e9 is not an amount"),
        (["submit", "x.blend", "--pool", "a b"], "--pool: 'a b' is not a pool name"),
        (["submit", "x.blend", "--gpu", ""], "--gpu: '' is not part of a GPU name"),
        (["node", "--pool", "../x"], "--pool: '../x' is not a pool name"),
        (["pool", "create", "a b"], "'a b' is not a pool name"),
        (["pool", "add", "studio"], "the following arguments are required: ACCOUNT"),
    ],
)
def test_bad_requirement_and_pool_options_are_usage_errors(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err


def _tessera(
    coordinator: RunningCoordinator, token: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            *args,
            "--coordinator",
            coordinator.url,
            "--token",
            token,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_pool_commands_and_tessera_job_show_why_a_job_waits(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    bundle: tuple[Path, str],
) -> None:
    created = _tessera(coordinator, tokens["dave"], "pool", "create", "daves")
    assert created.returncode == 0, created.stderr
    assert "Created pool 'daves', owned by dave" in created.stdout
    added = _tessera(coordinator, tokens["dave"], "pool", "add", "daves", "carol")
    assert added.returncode == 0 and "Added carol to pool 'daves'" in added.stdout
    listed = _tessera(coordinator, tokens["dave"], "pool", "list")
    assert "daves" in listed.stdout and "carol" in listed.stdout
    refused = _tessera(coordinator, tokens["dave"], "pool", "add", "studio", "dave")
    assert refused.returncode == 2 and "No pool 'studio'" in refused.stderr
    path, sha = bundle
    with (
        coordinator.client(tokens["studio"]) as studio,
        coordinator.client(tokens["bob"]) as bob,
    ):
        studio.upload_bundle(path)
        bob.register_node(_gpu_node("small-gpu", vram_gb=16))
        needs = JobRequirements(min_vram_mib=gb_to_mib(24), measured_peak_mib=100)
        job = studio.submit_job(
            job_spec(demo_info, sha, frames="1", device="OPTIX", requirements=needs)
        )
    shown = _tessera(coordinator, tokens["studio"], "job", job.id)
    assert shown.returncode == 0, shown.stderr
    assert "24.0 GB of VRAM on one GPU (--min-vram)" in shown.stdout
    assert "VRAM 24.0 GB" in shown.stdout  # the Needs line
