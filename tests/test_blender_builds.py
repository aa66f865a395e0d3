"""Extra Blender builds: `tessera blender add` registers them, the node offers their
versions, and a lease naming a series renders on that series' build.

Only bpy 5.0.1 exists on the test machine, so the "4.2" build is a stand-in: a script
that answers ``--version`` as Blender 4.2.3 LTS does (the captured fixture) and runs the
worker with the real bpy otherwise. It is real Blender underneath; only its name differs.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import BlenderNotFoundError, UsageError
from farm_node.config import NodeConfig
from farm_node.errors import LeaseError
from farm_node.hardware import probe_capabilities
from farm_node.main import more_builds
from farm_node.runner import TaskRunner
from renderers.build_registry import add_build, load_builds, registered, remove_build
from renderers.builds import BlenderBuild, clear_probe_cache
from renderers.worker import RenderLimits
from tests.test_node_runner import make_lease

FIXTURES = Path(__file__).parent / "fixtures" / "devices"
REPO = Path(__file__).resolve().parent.parent


def _stand_in(folder: Path, python: Path) -> Path:
    """A 'Blender 4.2.3' executable that renders with the real bpy."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "blender"
    version = FIXTURES / "blender_version_4.2.3_lts.txt"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then cat "{version}"; exit 0; fi\n'
        "for last; do :; done\n"
        f'exec "{python}" -I -u "$last"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture(autouse=True)
def _fresh_probes() -> None:
    clear_probe_cache()


def test_the_registry_adds_lists_and_removes_builds(
    bpy_build: BlenderBuild, tmp_path: Path
) -> None:
    registry = tmp_path / "home" / "blender-builds.json"
    old = add_build(registry, _stand_in(tmp_path / "b42", bpy_build.path))
    assert (old.kind, old.version) == ("executable", "4.2.3")
    bpy = add_build(registry, bpy_build.path)
    assert (bpy.kind, bpy.version) == ("bpy", "5.0.1")
    add_build(registry, old.path)  # again: replaced, not doubled
    assert [e["version"] for e in registered(registry)] == ["5.0.1", "4.2.3"]
    assert [b.version for b in load_builds(registry)] == ["5.0.1", "4.2.3"]
    assert remove_build(registry, old.path)
    assert not remove_build(registry, old.path)
    assert [e["path"] for e in registered(registry)] == [str(bpy_build.path.absolute())]


def test_a_path_that_is_not_blender_is_refused_with_the_reason(tmp_path: Path) -> None:
    registry = tmp_path / "blender-builds.json"
    with pytest.raises(BlenderNotFoundError, match="No Blender executable at"):
        add_build(registry, tmp_path / "nowhere" / "blender")
    fake = tmp_path / "blender"
    fake.write_text("#!/bin/sh\necho hello\n")
    fake.chmod(0o755)
    with pytest.raises(BlenderNotFoundError, match="does not look like Blender"):
        add_build(registry, fake)
    python = tmp_path / "python3"
    python.symlink_to("/bin/true")
    with pytest.raises(BlenderNotFoundError, match="without a usable bpy module"):
        add_build(registry, python)
    assert not registry.exists()


def test_a_damaged_registry_is_refused_with_what_to_do(tmp_path: Path) -> None:
    registry = tmp_path / "blender-builds.json"
    registry.write_text("{not json")
    with pytest.raises(UsageError, match="cannot be read"):
        registered(registry)
    registry.write_text(json.dumps({"path": "x"}))
    with pytest.raises(UsageError, match="not a list of builds"):
        registered(registry)


def test_the_node_offers_each_series_once_and_skips_broken_builds(
    bpy_build: BlenderBuild, tmp_path: Path
) -> None:
    stand_in = _stand_in(tmp_path / "b42", bpy_build.path)
    config = NodeConfig(
        coordinator_url="http://127.0.0.1:1",
        data_dir=tmp_path,
        more_builds=[stand_in, bpy_build.path, tmp_path / "gone" / "blender"],
    )
    (old,) = more_builds(config, bpy_build)
    assert old.version == "4.2.3", "5.0 is the main build's series; the missing one skipped"
    caps = probe_capabilities("n", bpy_build, None, [], cpuinfo="", meminfo="", more_builds=[old])
    assert caps.blender_versions == ["5.0.1", "4.2.3"]


def test_a_lease_renders_on_the_build_of_its_series(
    bpy_build: BlenderBuild, demo_scene: Path, tmp_path: Path
) -> None:
    old = add_build(tmp_path / "r.json", _stand_in(tmp_path / "b42", bpy_build.path))
    limits = RenderLimits(sandbox="off")  # the stand-in runs a Python outside its folder
    with TaskRunner(
        bpy_build, tmp_path / "scratch", task_timeout=120, limits=limits, more_builds=[old]
    ) as runner:
        assert runner.build_for(None) == bpy_build
        assert runner.build_for("5.0") == bpy_build
        assert runner.build_for("4.2") == old
        with pytest.raises(
            LeaseError, match=r"no Blender 4\.1 build \(it offers 5\.0\.1, 4\.2\.3\)"
        ):
            runner.build_for("4.1")
        lease = make_lease().model_copy(update={"blender_version": "4.2"})
        runner.render(lease, demo_scene, tmp_path / "old.exr")
        assert (tmp_path / "old.exr").is_file()
        (worker,) = runner._workers.values()
        assert worker.build == old, "rendered by the 4.2 build"
        runner.render(make_lease(lease_id="lease-2"), demo_scene, tmp_path / "new.exr")
        assert [w.build for w in runner._workers.values()] == [old, bpy_build]


def test_tessera_blender_add_list_remove(bpy_build: BlenderBuild, tmp_path: Path) -> None:
    stand_in = _stand_in(tmp_path / "b42", bpy_build.path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TESSERA_HOME"] = str(tmp_path / "home")

    def tessera(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "blender", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    added = tessera("add", str(stand_in))
    assert added.returncode == 0, added.stderr
    assert "Added Blender 4.2.3" in added.stdout
    listed = tessera("list", "--json")
    assert [e["version"] for e in json.loads(listed.stdout)] == ["4.2.3"]
    assert tessera("remove", str(stand_in)).returncode == 0
    again = tessera("remove", str(stand_in))
    assert again.returncode == 2 and "is not a registered Blender build" in again.stderr
    bad = tessera("add", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "No Blender executable at" in bad.stderr
