"""The node half of the GPU check: one worker per GPU, the warm-up, caches across restarts.

Run from the Tessera checkout with a Python that has bpy and Tessera's dependencies
(``run_gpu_check.sh node`` does, with the carried Python; on a dev machine:
``.venv/bin/python benchmarks/gpu/node_check.py OUT_DIR``). Everything runs on this
machine, on 127.0.0.1:

1. a coordinator (``tessera coordinator --port 0``); a provider and a requester account;
2. ``tessera node --device GPU --gpus all --cpu-worker --sandbox off --no-benchmark
   --warmup-timeout T``: the node's workers are listed every 2 s (``nodes``): when each
   was first seen warming, when it became ready (idle) or failed, and why;
3. the demo scene submitted twice, one job ``--device GPU`` (frames 1-4, 2x2 tiles) and
   one ``--device CPU``; which worker rendered what, and whether two GPU workers were
   busy at the same moment;
4. the node stopped (SIGINT) and started again: the second warm-up's time (the kernel
   caches under DATA/gpu-cache are kept) and the cache folders' sizes.

Writes OUT_DIR/node_check.json (after every step, so a time limit keeps what was
measured) and the coordinator's and node's logs. NODE_ARGS in the environment replaces
the node's device options (e.g. ``--device CPU --cpu-worker`` for a dry run without a
GPU). This is a measuring script, not product code: Tessera never imports it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from protocol.client import TesseraClient  # noqa: E402

POLL = 2.0


class Check:
    def __init__(self, out: Path, warmup_timeout: float, budget: float) -> None:
        self.out = out
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.warmup_timeout = warmup_timeout
        self.deadline = time.monotonic() + budget
        self.started = time.monotonic()
        self.results: dict[str, Any] = {"steps": []}
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env["PYTHONPATH"] = str(REPO)

    def log(self, message: str) -> None:
        print(f"[node_check {time.monotonic() - self.started:6.1f} s] {message}", flush=True)

    def save(self) -> None:
        path = self.out / "node_check.json"
        path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def tessera(self, *args: str, log: str, **env: str) -> subprocess.Popen[bytes]:
        handle = (self.out / log).open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            cwd=REPO,
            env={**self.env, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )

    def coordinator(self) -> tuple[subprocess.Popen[bytes], str, Path]:
        data = self.work / "coordinator"
        process = self.tessera(
            "coordinator", "--port", "0", "--data", str(data), log="coordinator.log"
        )
        while time.monotonic() < self.deadline:
            text = (self.out / "coordinator.log").read_text(errors="replace")
            if "listening on " in text:
                url = text.split("listening on ", 1)[1].split()[0]
                return process, url, data
            if process.poll() is not None:
                raise SystemExit(f"the coordinator exited:\n{text}")
            time.sleep(0.1)
        raise SystemExit("the coordinator did not start")

    def node(self, url: str, token: str) -> subprocess.Popen[bytes]:
        device_args = shlex.split(
            os.environ.get("NODE_ARGS", "--device GPU --gpus all --cpu-worker")
        )
        args = [
            "node",
            *device_args,
            "--coordinator",
            url,
            "--token",
            token,
            "--name",
            "gpu-check",
            "--sandbox",
            "off",
            "--no-benchmark",
            "--data",
            str(self.work / "node"),
            "--warmup-timeout",
            str(self.warmup_timeout),
        ]
        self.log("tessera node " + " ".join(device_args))
        return self.tessera(*args, log="node.log")

    def watch_warmup(
        self, admin: TesseraClient, node: subprocess.Popen[bytes], label: str, log_from: int
    ) -> dict[str, Any]:
        """Follow the node's log (and its workers' listing) until every GPU worker has
        warmed up or failed, the node exited, or the time is up."""
        seen: dict[str, dict[str, Any]] = {}
        t0 = time.monotonic()
        log = self.out / "node.log"
        found: dict[str, Any] = {}
        while time.monotonic() < self.deadline and node.poll() is None:
            text = log.read_text(errors="replace")[log_from:]
            found = parse_node_log(text)
            for info in admin.nodes():
                row = seen.setdefault(info.capabilities.name, {"states": []})
                state = [info.status, info.paused]
                if not row["states"] or row["states"][-1][1:] != state:
                    row["states"].append([round(time.monotonic() - t0, 1), *state])
                    self.log(f"{info.capabilities.name}: {info.status} {info.paused or ''}")
                row["devices"] = info.capabilities.devices
                row["gpus"] = [gpu.model_dump() for gpu in info.capabilities.gpus]
                row["blender"] = info.capabilities.blender_versions
            planned = found["gpu_workers"]
            if planned is not None and len(found["warmed"]) + len(found["failed"]) >= planned:
                break
            time.sleep(POLL)
        result = {
            "label": label,
            "seconds": round(time.monotonic() - t0, 1),
            "node_exit": node.poll(),
            **found,
            "listing": seen,
        }
        self.log(f"{label}: warmed {found['warmed']}, failed {found['failed']}")
        self.results["steps"].append(result)
        self.save()
        return result

    def submit(self, scene: Path, url: str, token: str, device: str) -> str:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "submit",
                str(scene),
                "--device",
                device,
                "--frames",
                "1-4",
                "--tiles",
                "2x2",
                "--samples",
                os.environ.get("JOB_SAMPLES", "64"),
                "--percentage",
                "50",
                "--name",
                f"gpu-check-{device}",
            ],
            cwd=REPO,
            env={**self.env, "TESSERA_COORDINATOR": url, "TESSERA_TOKEN": token},
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if done.returncode != 0:
            raise SystemExit(f"submit --device {device} failed:\n{done.stderr}")
        return done.stdout.strip().split()[-1]

    def render_jobs(
        self,
        admin: TesseraClient,
        client: TesseraClient,
        url: str,
        token: str,
        devices: tuple[str, ...],
    ) -> None:
        scene = self.work / "demo.blend"
        if not scene.exists():
            from renderers.builds import probe_bpy
            from renderers.demo_scene import generate_demo_scene

            build = probe_bpy()
            assert build is not None, "no bpy in this Python"
            generate_demo_scene(build, scene)
        jobs = {device: self.submit(scene, url, token, device) for device in devices}
        t0 = time.monotonic()
        busy_gpu_max = 0
        while time.monotonic() < self.deadline:
            statuses = {d: client.job(j).status.value for d, j in jobs.items()}
            busy = [n for n in admin.nodes() if n.status == "busy" and n.capabilities.gpus]
            busy_gpu_max = max(busy_gpu_max, len(busy))
            if all(s in ("completed", "failed", "canceled") for s in statuses.values()):
                break
            time.sleep(0.5)
        result = {
            "label": "jobs",
            "seconds": round(time.monotonic() - t0, 1),
            "jobs": {d: client.job(j).model_dump(mode="json") for d, j in jobs.items()},
            "gpu_workers_busy_at_once": busy_gpu_max,
            "tasks_per_worker": {n.capabilities.name: n.tasks_completed for n in admin.nodes()},
        }
        self.log(f"jobs: {result['tasks_per_worker']}, GPU workers at once: {busy_gpu_max}")
        self.results["steps"].append(result)
        self.save()

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def cache_sizes(self) -> dict[str, int]:
        root = self.work / "node" / "gpu-cache"
        return (
            {
                folder.name: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                for folder in sorted(root.iterdir())
            }
            if root.exists()
            else {}
        )


_PLANNED = re.compile(r"(\d+) workers?: (.*)$", re.MULTILINE)
_WARMED = re.compile(r"(\S+): warmed up on (\S+) in ([\d.]+) s")
_FAILED = re.compile(
    r"(\S+): warm-up on (\S+) failed; this worker takes no work: (.*)$", re.MULTILINE
)


def parse_node_log(text: str) -> dict[str, Any]:
    """The workers planned, warmed up (seconds) and failed (reason) in a node's log."""
    planned = _PLANNED.search(text)
    workers = planned.group(2).split("; ") if planned else []
    return {
        "workers": workers,
        "gpu_workers": None if planned is None else sum(w != "CPU" for w in workers),
        "warmed": {m.group(1): [m.group(2), float(m.group(3))] for m in _WARMED.finditer(text)},
        "failed": {m.group(1): [m.group(2), m.group(3)] for m in _FAILED.finditer(text)},
    }


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp/node-check"))
    out.mkdir(parents=True, exist_ok=True)
    check = Check(
        out,
        warmup_timeout=float(os.environ.get("WARMUP_TIMEOUT", "540")),
        budget=float(os.environ.get("NODE_BUDGET_S", "560")),
    )
    coordinator, url, data = check.coordinator()
    node: subprocess.Popen[bytes] | None = None
    try:
        admin = TesseraClient(url, (data / "admin.token").read_text().strip())
        provider = admin.create_account("provider", "provider").token
        requester = admin.create_account("requester", "requester").token
        client = TesseraClient(url, requester)
        node = check.node(url, provider)
        first = check.watch_warmup(admin, node, "first start (cold caches)", 0)
        devices = ("GPU", "CPU") if first["gpu_workers"] else ("CPU",)
        check.render_jobs(admin, client, url, requester, devices)
        check.stop(node)
        check.results["cache_bytes_after_first_run"] = check.cache_sizes()
        offset = len((out / "node.log").read_text(errors="replace"))
        node = check.node(url, provider)
        check.watch_warmup(admin, node, "second start (caches kept)", offset)
        check.results["cache_bytes"] = check.cache_sizes()
        check.save()
    finally:
        if node is not None:
            check.stop(node)
        check.stop(coordinator)
        check.save()
    check.log(f"done: {out / 'node_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
