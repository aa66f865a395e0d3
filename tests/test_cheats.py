"""The cheating modes of farm_node/cheats.py against real rendered tiles, and the options
that turn them on (`tessera node --cheat`, `tessera render/demo --cheaters`).

Whether the coordinator catches each cheat is the farm's end-to-end business; here each
mode must fake exactly what it says and keep the file's structure, so that only the
pixels can give it away.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import OpenEXR
import pytest

from app.cli.accounts import _node_row
from app.cli.local import format_providers, provider_summary
from app.local_farm import LocalFarm
from common.errors import UsageError
from farm_node.cheats import (
    FAKES,
    SOMETIMES_RATE,
    Cheat,
    CheatingRunner,
    CheatMode,
    cheat_modes,
    fewer_samples,
    parse_cheat,
)
from farm_node.config import NodeConfig
from protocol.models import (
    Lease,
    NodeCapabilities,
    NodeInfo,
    Region,
    RenderAssignment,
    Task,
    TaskKind,
    TaskStatus,
)
from renderers.exr import read_exr
from renderers.regions import PixelRect, border_fractions
from renderers.worker import RenderRequest, RenderResult, RenderWorker

REPO = Path(__file__).resolve().parent.parent
# The demo scene at 10 % is 64x36.
WIDTH, HEIGHT, PERCENTAGE, SAMPLES = 64, 36, 10, 8
TILE_A = PixelRect(0, 0, 32, 18)
TILE_B = PixelRect(24, 10, 64, 36)  # another size: a copy of A is tiled and cropped to it


def make_lease(
    rect: PixelRect = TILE_A,
    kind: TaskKind = TaskKind.RENDER,
    samples: int | None = SAMPLES,
    lease_id: str = "lease-1",
) -> Lease:
    region = Region(x0=rect.x0, y0=rect.y0, x1=rect.x1, y1=rect.y1)
    return Lease(
        lease_id=lease_id,
        task=Task(
            id=f"task-{lease_id}",
            job_id="job-1",
            kind=kind,
            frame=1,
            tile_index=0,
            status=TaskStatus.ACTIVE,
            attempts=0,
        ),
        job_name="demo",
        bundle="b" * 64,
        bundle_size=0,
        scene_path="scene.blend",
        assignment=RenderAssignment(
            frame=1,
            width=WIDTH,
            height=HEIGHT,
            render_region=region,
            core_region=region,
            whole_frame=False,
            samples=samples or SAMPLES,
            percentage=PERCENTAGE,
            resolution_x=WIDTH * 100 // PERCENTAGE,
            resolution_y=HEIGHT * 100 // PERCENTAGE,
            seed=0,
            denoise_data=True,
        ),
        device="CPU",
        samples=samples or 64,
        expires_at=datetime.now(UTC) + timedelta(minutes=5),
        heartbeat_interval=1.0,
    )


def _render(worker: RenderWorker, scene: Path, rect: PixelRect, output: Path) -> Path:
    worker.render(
        RenderRequest(
            scene=scene,
            frame=1,
            output=output,
            border=border_fractions(rect, WIDTH, HEIGHT),
            samples=SAMPLES,
            percentage=PERCENTAGE,
            seed=0,
            denoise_data=True,
        )
    )
    return output


@pytest.fixture(scope="module")
def tiles(
    worker: RenderWorker, demo_scene: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Two real tiles of the demo scene (Combined + denoising passes), rendered once."""
    folder = tmp_path_factory.mktemp("tiles")
    return {
        "a": _render(worker, demo_scene, TILE_A, folder / "a.exr"),
        "b": _render(worker, demo_scene, TILE_B, folder / "b.exr"),
    }


def _copy_of(tile: Path, folder: Path, name: str = "out.exr") -> Path:
    target = folder / name
    shutil.copyfile(tile, target)
    return target


def _pixels(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    image = read_exr(path)
    return {name: image.channel(name) for name in image.channel_names()}


def _structure(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Every part's name and whole header (values as text): what a reader sees first."""
    exr = OpenEXR.File(str(path), header_only=True)
    return [
        (part.name(), {key: str(value) for key, value in part.header.items()}) for part in exr.parts
    ]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake(cheat: Cheat, lease: Lease, tile: Path, folder: Path, name: str = "out.exr") -> Path:
    """Do what the daemon does: plan, "render" (copy the real tile), finish."""
    plan = cheat.plan(lease)
    output = _copy_of(tile, folder, name)
    cheat.finish(plan, output)
    return output


# --- the modes ------------------------------------------------------------------------------


def test_the_real_tiles_have_the_passes_a_node_uploads(tiles: dict[str, Path]) -> None:
    image = read_exr(tiles["a"])
    assert (image.width, image.height) == (TILE_A.width, TILE_A.height)
    assert [part.name for part in image.parts] == [
        "ViewLayer.Combined",
        "ViewLayer.Denoising Normal",
        "ViewLayer.Denoising Albedo",
        "ViewLayer.Denoising Depth",
    ]
    assert image.combined_rgba()[..., :3].max() > 0


def test_black_zeroes_every_channel_but_an_opaque_alpha(
    tiles: dict[str, Path], tmp_path: Path
) -> None:
    faked = _fake(Cheat("black"), make_lease(), tiles["a"], tmp_path)
    assert _structure(faked) == _structure(tiles["a"])
    for name, pixels in _pixels(faked).items():
        expected = 1.0 if name == "ViewLayer.Combined.A" else 0.0
        assert pixels.dtype == np.float32 and np.all(pixels == expected), name


def test_noise_is_uniform_up_to_each_channels_real_maximum(
    tiles: dict[str, Path], tmp_path: Path
) -> None:
    faked = _fake(Cheat("noise", rng=random.Random(1)), make_lease(), tiles["a"], tmp_path)
    assert _structure(faked) == _structure(tiles["a"])
    real, fake = _pixels(tiles["a"]), _pixels(faked)
    assert fake.keys() == real.keys()
    for name, pixels in fake.items():
        top = max(0.0, float(real[name].max()))
        assert pixels.dtype == real[name].dtype
        assert pixels.min() >= 0 and pixels.max() <= top, name
        if top > 0:
            assert not np.array_equal(pixels, real[name]), name
            # uniform on [0, top]: the mean is near top / 2 (576 pixels)
            assert abs(float(pixels.mean()) - top / 2) < top / 8, name
    # The same seed fakes the same pixels; another seed others.
    again = _fake(Cheat("noise", rng=random.Random(1)), make_lease(), tiles["a"], tmp_path, "2.exr")
    other = _fake(Cheat("noise", rng=random.Random(2)), make_lease(), tiles["a"], tmp_path, "3.exr")
    combined = "ViewLayer.Combined.R"
    assert np.array_equal(_pixels(again)[combined], fake[combined])
    assert not np.array_equal(_pixels(other)[combined], fake[combined])


def test_copy_uploads_the_tile_before_fitted_to_the_size_asked(
    tiles: dict[str, Path], tmp_path: Path
) -> None:
    cheat = Cheat("copy")
    # The first tile has nothing earlier to copy: it is uploaded shifted by half its size.
    first = _fake(cheat, make_lease(TILE_A), tiles["a"], tmp_path, "first.exr")
    assert _structure(first) == _structure(tiles["a"])
    real_a = _pixels(tiles["a"])
    half = (TILE_A.height // 2, TILE_A.width // 2)
    for name, pixels in _pixels(first).items():
        assert np.array_equal(pixels, np.roll(real_a[name], half, axis=(0, 1))), name
    assert not np.array_equal(
        _pixels(first)["ViewLayer.Combined.R"], real_a["ViewLayer.Combined.R"]
    )
    # The next tile (another size) gets the REAL pixels of the first, tiled and cropped.
    second = _fake(cheat, make_lease(TILE_B, lease_id="lease-2"), tiles["b"], tmp_path, "b.exr")
    assert _structure(second) == _structure(tiles["b"])
    height, width = TILE_B.height, TILE_B.width
    for name, pixels in _pixels(second).items():
        expected = np.tile(real_a[name], (2, 2))[:height, :width]
        assert pixels.shape == (height, width) and np.array_equal(pixels, expected), name


def test_copy_of_the_same_tile_again_is_still_faked(tiles: dict[str, Path], tmp_path: Path) -> None:
    cheat = Cheat("copy")
    _fake(cheat, make_lease(), tiles["a"], tmp_path, "first.exr")
    again = _fake(cheat, make_lease(lease_id="lease-2"), tiles["a"], tmp_path, "again.exr")
    real = _pixels(tiles["a"])["ViewLayer.Combined.R"]
    assert not np.array_equal(_pixels(again)["ViewLayer.Combined.R"], real)


def test_samples_changes_only_the_request(tiles: dict[str, Path], tmp_path: Path) -> None:
    cheat = Cheat("samples")
    lease = make_lease(samples=SAMPLES)
    plan = cheat.plan(lease)
    assert plan.fake is CheatMode.SAMPLES
    assert plan.lease.assignment is not None and plan.lease.assignment.samples == SAMPLES // 4
    assert plan.lease.samples == SAMPLES // 4
    # Everything else in the lease is as asked.
    assert plan.lease.model_copy(update={"assignment": lease.assignment, "samples": SAMPLES}) == (
        lease
    )
    output = _copy_of(tiles["a"], tmp_path)
    before = _sha(output)
    cheat.finish(plan, output)
    assert _sha(output) == before, "the output is what Blender wrote"


@pytest.mark.parametrize(
    ("asked", "scene_samples", "rendered"), [(2, 2, 1), (1, 1, 1), (400, 400, 100), (64, 64, 16)]
)
def test_samples_asks_a_quarter_and_at_least_one(
    asked: int | None, scene_samples: int, rendered: int
) -> None:
    lease = make_lease(samples=asked).model_copy(update={"samples": scene_samples})
    fewer = fewer_samples(lease)
    assert fewer.assignment is not None
    assert (fewer.assignment.samples, fewer.samples) == (rendered, rendered)


def test_sometimes_fakes_about_one_task_in_ten_with_every_mode() -> None:
    draws = 4000
    plans = [Cheat("sometimes", rng=random.Random(42)).plan(make_lease()).fake for _ in range(3)]
    assert len(set(plans)) == 1, "one seed, one decision"
    cheat = Cheat("sometimes", rng=random.Random(7))
    fakes = Counter(cheat.plan(make_lease(lease_id=f"l{i}")).fake for i in range(draws))
    faked = draws - fakes[None]
    assert abs(faked / draws - SOMETIMES_RATE) < 0.02, fakes
    assert set(fakes) - {None} == set(FAKES), "each fake is drawn"
    assert CheatMode.SOMETIMES not in fakes


def test_sometimes_leaves_honest_tasks_alone(tiles: dict[str, Path], tmp_path: Path) -> None:
    cheat = Cheat("sometimes", rng=random.Random(3))
    honest = faked = 0
    for index in range(30):
        lease = make_lease(lease_id=f"lease-{index}")
        plan = cheat.plan(lease)
        output = _copy_of(tiles["a"], tmp_path, f"{index}.exr")
        cheat.finish(plan, output)
        if plan.honest:
            honest += 1
            assert plan.lease == lease and _sha(output) == _sha(tiles["a"])
        else:
            faked += 1
    assert honest >= 20 and honest + faked == 30


def test_verify_leases_are_cheated_and_denoise_leases_never(
    tiles: dict[str, Path], tmp_path: Path
) -> None:
    window = PixelRect(4, 4, 12, 12)  # a verify task re-renders a small window
    for mode in CheatMode:
        cheat = Cheat(mode, rng=random.Random(0))
        denoise = make_lease(kind=TaskKind.DENOISE)
        plan = cheat.plan(denoise)
        assert plan.honest and plan.lease == denoise, mode
        output = _copy_of(tiles["a"], tmp_path)
        cheat.finish(plan, output)
        assert _sha(output) == _sha(tiles["a"]), mode
        if mode is not CheatMode.SOMETIMES:
            assert cheat.plan(make_lease(window, kind=TaskKind.VERIFY)).fake is mode
    faked = _fake(Cheat("black"), make_lease(window, kind=TaskKind.VERIFY), tiles["a"], tmp_path)
    assert np.all(_pixels(faked)["ViewLayer.Combined.R"] == 0)


def test_a_lease_without_an_assignment_is_not_cheated() -> None:
    lease = make_lease().model_copy(update={"assignment": None})
    assert Cheat("black").plan(lease).honest


# --- names and settings ---------------------------------------------------------------------


def test_modes_parse_and_go_round_robin() -> None:
    assert parse_cheat(" Black ") is CheatMode.BLACK
    with pytest.raises(UsageError, match="no cheat 'gold'") as caught:
        parse_cheat("gold")
    assert "samples, copy, noise, black, sometimes" in caught.value.hint
    assert [mode.value for mode in cheat_modes(7)] == [
        "samples", "copy", "noise", "black", "sometimes", "samples", "copy",
    ]  # fmt: skip
    assert cheat_modes(0) == []
    with pytest.raises(UsageError, match="0 or more"):
        cheat_modes(-1)


def test_the_node_setting_is_validated(tmp_path: Path) -> None:
    config = NodeConfig(coordinator_url="http://x", data_dir=tmp_path)
    assert config.cheat is None, "an honest node by default"
    NodeConfig(coordinator_url="http://x", data_dir=tmp_path, cheat="noise").validate()
    with pytest.raises(UsageError, match="--cheat must be one of samples, copy, noise"):
        NodeConfig(coordinator_url="http://x", data_dir=tmp_path, cheat="gold").validate()


def test_a_local_farm_gives_every_node_an_account_and_cheaters_their_modes(
    tmp_path: Path,
) -> None:
    farm = LocalFarm(tmp_path, nodes=2, cheats=[mode.value for mode in cheat_modes(3)])
    assert farm._plan_nodes() == [
        ("local-1", None),
        ("local-2", None),
        ("cheater-1-samples", "samples"),
        ("cheater-2-copy", "copy"),
        ("cheater-3-noise", "noise"),
    ]
    with pytest.raises(UsageError):
        LocalFarm(tmp_path, cheats=["gold"])._plan_nodes()


# --- the summary and `tessera nodes` ---------------------------------------------------------


def _node(name: str, **fields: Any) -> NodeInfo:
    return NodeInfo(
        id=f"id-{name}",
        owner=name,
        capabilities=NodeCapabilities(name=name, price=fields.pop("price", 0.0)),
        status="idle",
        last_seen=datetime.now(UTC),
        **fields,
    )


def test_the_provider_summary_reads_what_the_coordinator_reports() -> None:
    nodes = [
        _node("cheater-1-black", tasks_completed=1, rejected=3, reputation=0.03,
              suspended="3 results rejected by duplicate samples"),
        _node("local-1", tasks_completed=9, earned=1.25, verified=4),
        _node("stranger"),  # an older coordinator: none of the new fields
    ]  # fmt: skip
    providers = provider_summary(nodes, {"local-1": None, "cheater-1-black": "black"})
    assert [p["name"] for p in providers] == ["local-1", "cheater-1-black", "stranger"]
    assert providers[0] == {
        "name": "local-1",
        "account": "local-1",
        "cheat": None,
        "accepted": 9,
        "accepted_seconds": 0.0,
        "success_rate": None,
        "rejected": 0,
        "earned": 1.25,
        "reputation": 1.0,
        "suspended": None,
    }
    assert providers[1]["cheat"] == "black" and providers[1]["rejected"] == 3
    assert providers[2]["cheat"] is None and providers[2]["reputation"] == 1.0
    json.dumps(providers)  # JSON-ready
    lines = format_providers(providers, True)
    assert lines[0].split() == [
        "PROVIDER", "CHEAT", "ACCEPTED", "REJECTED", "SUCCESS", "EARNED", "REPUTATION",
        "SUSPENDED",
    ]  # fmt: skip
    assert lines[1].split() == ["local-1", "-", "9", "0", "-", "1.25", "1.00", "-"]
    assert "SUSPENDED: 3 results rejected" in lines[2]
    assert lines[-1].strip() == "Ledger: checks out (every invariant holds)"
    failed = format_providers(providers, False, ["task t paid twice"])
    assert failed[-2:] == ["  Ledger: 1 problem(s)", "    - task t paid twice"]
    assert "not checked (no route)" in format_providers([], None, ["no route"])[-1]


def test_a_nodes_row_shows_price_reputation_earnings_and_suspension() -> None:
    row = _node_row(
        _node("n", price=0.5, earned=2.0, reputation=0.25, rejected=2, tasks_completed=6,
              success_rate=0.75, accepted_seconds=75.0)
    )  # fmt: skip
    assert row[1] == "idle" and row[-4:] == ("2", "0.5", "0.25", "2")
    assert row[-6:-4] == ("75%", "6 (1 min 15 s)")
    assert _node_row(_node("n", suspended="too many rejections"))[1] == "SUSPENDED"


# --- the command line -----------------------------------------------------------------------


def tessera(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_node_refuses_an_unknown_cheat(tmp_path: Path) -> None:
    done = tessera(
        "node", "--coordinator", "http://127.0.0.1:9", "--token", "t", "--cheat", "gold",
        "--no-benchmark", "--data", tmp_path / "node",
    )  # fmt: skip
    assert done.returncode == 2
    assert "argument --cheat: There is no cheat 'gold'" in done.stderr
    assert "samples, copy, noise, black, sometimes" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "node").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["render", "scene.blend", "--cheaters", "-1"], "-1 is negative; use 0 or more"),
        (["demo", "--cheaters", "-2"], "-2 is negative; use 0 or more"),
        (["demo", "--cheaters", "two"], "'two' is not a whole number"),
    ],
)
def test_render_and_demo_refuse_a_bad_number_of_cheaters(args: list[str], message: str) -> None:
    done = tessera(*args)
    assert done.returncode == 2
    assert "argument --cheaters" in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr


def test_the_help_says_cheating_is_for_demonstrating_verification() -> None:
    done = tessera("node", "--help")
    assert done.returncode == 0
    assert "demonstrate the farm's verification" in " ".join(done.stdout.split())


class _RecordingRunner:
    """A stand-in for TaskRunner: 'renders' by copying a real tile, records what it got."""

    def __init__(self, tile: Path) -> None:
        self.tile = tile
        self.rendered: list[Lease] = []
        self.denoised: list[Lease] = []
        self.cancels = 0

    def render(self, lease: Lease, scene: Path, output: Path, on_progress: Any = None) -> Any:
        self.rendered.append(lease)
        shutil.copyfile(self.tile, output)
        return RenderResult(output, 0.1, WIDTH, HEIGHT, "CPU")

    def denoise(self, lease: Lease, source: Path, output: Path, samples: int | None = None) -> Path:
        self.denoised.append(lease)
        return output

    def cancel(self) -> None:
        self.cancels += 1


def test_the_cheating_runner_wraps_the_real_one(tiles: dict[str, Path], tmp_path: Path) -> None:
    real = _RecordingRunner(tiles["a"])
    runner = CheatingRunner(real, Cheat("samples"))  # type: ignore[arg-type]
    lease = make_lease(samples=SAMPLES)
    result = runner.render(lease, tmp_path / "scene.blend", tmp_path / "out.exr")
    assert result.output == tmp_path / "out.exr"
    (asked,) = real.rendered
    assert asked.samples == SAMPLES // 4 and lease.samples == SAMPLES, "the real runner asked less"

    black = CheatingRunner(real, Cheat("black"))  # type: ignore[arg-type]
    black.render(lease, tmp_path / "scene.blend", tmp_path / "black.exr")
    assert real.rendered[-1] == lease, "black renders what was asked, then fakes the pixels"
    assert not np.any(_pixels(tmp_path / "black.exr")["ViewLayer.Combined.R"])

    denoise = make_lease(kind=TaskKind.DENOISE)
    assert black.denoise(denoise, tmp_path / "in.exr", tmp_path / "d.exr") == tmp_path / "d.exr"
    black.cancel()
    assert (real.denoised, real.cancels) == ([denoise], 1)
