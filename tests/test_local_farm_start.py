"""Starting a local farm waits without sleeping past it, and gives up at once when it is
stopped: a `tessera render` whose option or scene is bad fails without waiting for the
farm it started beside its preparation (app/local_farm.py; docs/render-overhead.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.local_farm import LocalFarm, LocalFarmError

REPO = Path(__file__).resolve().parent.parent


def test_a_farm_stopped_while_it_starts_gives_up_and_stops_its_processes(
    tmp_path: Path,
) -> None:
    farm = LocalFarm(tmp_path / "farm", nodes=1, threads_per_node=1)
    farm.start_in_background()
    while len(farm.processes) < 2 and farm._starter is not None and farm._starter.is_alive():
        farm._stopping.wait(0.005)  # until the coordinator and the node are spawned
    spawned = list(farm.processes)
    assert len(spawned) == 2
    farm.stop()
    with pytest.raises(LocalFarmError, match="stopped while it started"):
        farm.wait_started()
    assert all(process.poll() is not None for process in spawned)
    assert not farm.processes


def test_a_farm_starts_and_registers_its_nodes(tmp_path: Path) -> None:
    with LocalFarm(
        tmp_path / "farm", nodes=1, threads_per_node=1, node_args=["--no-benchmark"]
    ) as farm:
        assert farm.url.startswith("http://127.0.0.1:")
        assert farm.marks["coordinator_listening"] <= farm.marks["nodes_registered"]
        assert farm.node_names == ["local-1"]


def test_render_with_a_bad_job_option_fails_with_its_farm_stopped(
    demo_scene: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = [sys.executable, "-m", "app.cli", "render", str(demo_scene), "--nodes", "1"]
    argv += ["--samples", "2000000", "--out", str(tmp_path / "out")]
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "samples" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
