"""Make the README's screenshots of every page of the desktop app (`make screenshots`).

Starts a local farm (a coordinator and two priced nodes), renders the demo scene on it
in tiles so the Jobs, Nodes and Wallet pages have something to show, leaves a second
job paused half-way, then runs `tessera app --screenshot PAGE FILE.png` for each page
against that farm (the Submit page with the demo scene loaded). Writes
docs/screenshots/PAGE.png. Uses only the public CLI: nothing here is farm logic.

Run from the repository root with the project's venv: `python -m resources.screenshots`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.local_farm import LOCAL_CREDITS, LOCAL_PRICE, LocalFarm
from protocol.client import TesseraClient

REPO = Path(__file__).resolve().parent.parent
DEMO_SCENE = REPO / "resources" / "scenes" / "demo.blend"
PAGES = ("submit", "jobs", "nodes", "wallet", "provide", "settings")
SUBMIT = ["--percentage", "20", "--samples", "16", "--max-price", str(LOCAL_PRICE)]


def tessera(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"tessera {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = parser.parse_args()
    if not DEMO_SCENE.is_file():
        raise SystemExit(f"{DEMO_SCENE} is missing: run `make demo` or `make screenshots`.")
    with tempfile.TemporaryDirectory(prefix="tessera-shots-") as scratch:
        home = Path(scratch) / "home"
        with LocalFarm(
            Path(scratch) / "farm",
            nodes=2,
            threads_per_node=1,
            price=LOCAL_PRICE,
            credits=LOCAL_CREDITS,
            node_args=["--no-benchmark"],
        ) as farm:
            env = {
                **os.environ,
                "TESSERA_HOME": str(home),
                "TESSERA_COORDINATOR": farm.url,
                "TESSERA_TOKEN": farm.requester_token,
                "QT_QPA_PLATFORM": "offscreen",
            }
            print("rendering the demo scene on a local farm of 2 nodes...", flush=True)
            tessera(
                [
                    "submit",
                    str(DEMO_SCENE),
                    "--frames",
                    "1-4",
                    "--tiles",
                    "3x2",
                    *SUBMIT,
                    "--wait",
                    "--out",
                    str(Path(scratch) / "frames"),
                ],
                env,
            )
            second = ["submit", str(DEMO_SCENE), "--frames", "5-24", "--tiles", "3x2", *SUBMIT]
            job_id = tessera(second, env).strip()
            pause_half_way(farm, job_id)
            args.out.mkdir(parents=True, exist_ok=True)
            for page in PAGES:
                target = args.out / f"{page}.png"
                scene = [str(DEMO_SCENE)] if page == "submit" else []
                tessera(["app", *scene, "--screenshot", page, str(target)], env)
                print(f"wrote {target.relative_to(REPO)}", flush=True)
    return 0


def pause_half_way(farm: LocalFarm, job_id: str) -> None:
    """Let the second job get going, then pause it so the shots show one in progress."""
    with TesseraClient(farm.url, farm.requester_token) as client:
        deadline = time.monotonic() + 300
        while client.job(job_id).progress.tasks_done < 20 and time.monotonic() < deadline:
            time.sleep(0.5)
        client.pause(job_id)


if __name__ == "__main__":
    sys.exit(main())
