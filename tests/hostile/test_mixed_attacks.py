"""Issue 17's "must show": a hostile requester and a hostile provider attack a real
coordinator for a bounded time while a real honest `tessera node` renders an honest
requester's jobs; afterwards the farm still leases and completes an honest job, no honest
provider was penalised, the books balance and nothing accepted was lost.

The attacks are those of the single-attack files (test_requester_attacks,
test_provider_attacks, test_http_abuse), mixed in random order (fixed seeds) in three
threads. Every loop is bounded in count and time. The attack phase lasts 60 s; set
``TESSERA_HOSTILE_SECONDS`` for a longer soak (read when this module is imported, since
the test fixtures clear TESSERA_* variables).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests

from protocol.models import Lease
from tests.farm_tools import make_bundle
from tests.hostile.attack_tools import (
    HostileFarm,
    bright_previews,
    call,
    hostile_farm,
    raw_json,
    rss_peak_kb,
    spec,
    write_tile_exr,
)
from tests.hostile.mixed_tools import (
    Tally,
    black_scene,
    check_frame,
    demo_spec,
    real_node,
    wait_until,
)
from tests.hostile.test_http_abuse import BROKEN
from tests.hostile.test_provider_attacks import exr_bomb

SECONDS = float(os.environ.get("TESSERA_HOSTILE_SECONDS", "60"))
SEED = 17
JSON = {"Content-Type": "application/json"}
FOUR_XX = set(range(400, 500))
#: A frame of the demo scene at 10%.
SIZE = (64, 36)
LONG_TEXT = "\n".join(f"PWNED line {i}: " + "A" * 60 for i in range(40))[:3000]


def _status(farm: HostileFarm, token: str, job: str) -> str:
    reply = call(farm.url, "GET", f"/jobs/{job}", token)
    return str(reply.json()["status"]) if reply.status_code == 200 else f"http {reply.status_code}"


def _get(url: str, path: str, token: str | None, **kw: Any) -> requests.Response | None:
    try:
        return call(url, "GET", path, token, timeout=15, **kw)
    except requests.RequestException:
        return None


class Requester:
    """The hostile requester's attacks; each call is one bounded attack."""

    def __init__(self, farm: HostileFarm, token: str, tally: Tally, shas: dict[str, str]):
        self.farm, self.token, self.tally, self.shas = farm, token, tally, shas
        self.jobs: list[str] = []
        self.budget = {"fake_preview_black": 3, "one_sample": 3}

    def _post(self, attack: str, path: str, data: bytes, allowed: set[int]) -> None:
        reply = call(self.farm.url, "POST", path, self.token, data=data, headers=JSON)
        self.tally.expect(attack, reply.status_code, allowed, reply.text)

    def nan_preview(self, rng: random.Random) -> None:
        body = spec(self.shas["fake"], max_price=2.0, previews=bright_previews(range(1, 2), 2))
        body["previews"][0]["luminance"][0] = "@@RAW@@"
        raw = rng.choice(["NaN", "Infinity", "-Infinity"])
        path = rng.choice(["/jobs", "/jobs/estimate"])
        self._post("nan_preview", path, raw_json(body, **{"@@RAW@@": raw}), {422})

    def absurd_price(self, rng: random.Random) -> None:
        body = spec(self.shas["fake"])
        body[rng.choice(["max_price", "max_credits"])] = "@@RAW@@"
        raw = rng.choice(["Infinity", "1e308", "-Infinity", "NaN"])
        path = rng.choice(["/jobs", "/jobs/estimate"])
        self._post("absurd_price", path, raw_json(body, **{"@@RAW@@": raw}), {422})

    def huge_plan(self, rng: random.Random) -> None:
        body = spec(
            self.shas["fake"],
            scene={"resolution_x": 4096, "resolution_y": 4096, "frame_end": 250},
            percentage=100,
            frames={"start": 1, "end": rng.choice([25, 250])},
            tiles={"columns": 64, "rows": 64},
        )
        started = time.monotonic()
        reply = call(self.farm.url, "POST", "/jobs/estimate", self.token, json_body=body)
        took = time.monotonic() - started
        self.tally.expect("huge_plan", reply.status_code, {413, 422}, reply.text)
        if took > 5 and reply.status_code != 429:
            self.tally.problem(f"huge_plan: the refusal took {took:.1f}s")

    def fake_preview_black(self, rng: random.Random) -> None:
        """Bright previews for a scene that renders black: the honest node's black tiles
        must not be refused or held against it."""
        body = demo_spec(
            self.shas["black"],
            f"bright-lies-{len(self.jobs)}",
            (1, 1),
            max_price=2.0,
            previews=bright_previews(range(1, 2), 16),
        )
        self._submit("fake_preview_black", body, rng)

    def one_sample(self, rng: random.Random) -> None:
        """A spec that says the scene has 1 sample: the lease must say 1, and pay for 1."""
        frame = rng.randint(5, 24)
        body = demo_spec(
            self.shas["demo"],
            f"one-sample-{len(self.jobs)}",
            (frame, frame),
            tiles=(1, 1),
            samples=None,
            scene={"samples": 1},
            max_price=2.0,
        )
        self._submit("one_sample", body, rng)

    def _submit(self, attack: str, body: dict[str, Any], rng: random.Random) -> None:
        if self.budget[attack] <= 0:  # bounded: each of these jobs costs the honest node work
            return self.huge_frame(rng)
        self.budget[attack] -= 1
        reply = call(self.farm.url, "POST", "/jobs", self.token, json_body=body)
        self.tally.expect(attack, reply.status_code, {201}, reply.text)
        if reply.status_code == 201:
            self.jobs.append(str(reply.json()["id"]))
        return None

    def broken_bundle(self, rng: random.Random) -> None:
        kind = rng.choice(["corrupt-deflate", "encrypted", "method-99", "method-9"])
        data = BROKEN[kind]()
        sha = hashlib.sha256(data).hexdigest()
        put = call(self.farm.url, "PUT", f"/bundles/{sha}", self.token, data=data)
        if put.status_code == 200:
            self.tally.note(f"broken_bundle:{kind}:put", 200)
            reply = call(self.farm.url, "POST", "/jobs", self.token, json_body=spec(sha))
            self.tally.expect(f"broken_bundle:{kind}:job", reply.status_code, FOUR_XX, reply.text)
        else:
            self.tally.expect(f"broken_bundle:{kind}:put", put.status_code, FOUR_XX, put.text)

    def huge_frame(self, rng: random.Random) -> None:
        job = rng.choice(self.jobs) if self.jobs else str(uuid.uuid4())
        frame = rng.choice(["99999999999999999999", "-99999999999999999999", "2147483648"])
        kind = rng.choice(["exr", "png"])
        reply = _get(self.farm.url, f"/jobs/{job}/frames/{frame}.{kind}", self.token)
        if reply is None:
            self.tally.problem("huge_frame: no reply")
        else:
            self.tally.expect("huge_frame", reply.status_code, {404, 422}, reply.text)

    def attacks(self) -> list[Callable[[random.Random], None]]:
        return [
            self.nan_preview,
            self.absurd_price,
            self.huge_plan,
            self.fake_preview_black,
            self.one_sample,
            self.broken_bundle,
            self.huge_frame,
        ]


class Provider:
    """The hostile provider (its own account and node, registered over POST /nodes)."""

    def __init__(self, farm: HostileFarm, token: str, tally: Tally, folder: Path, bomb: bytes):
        self.farm, self.token, self.tally, self.folder = farm, token, tally, folder
        self.node = farm.node(token, "eve-box")
        folder.mkdir(parents=True, exist_ok=True)
        self.bomb = bomb
        self.wrong_exr = write_tile_exr(folder / "wrong.exr", np.full((40, 50, 4), 7.0, np.float32))
        self.racing = [
            write_tile_exr(folder / f"race{i}.exr", np.full((300, 300, 4), i + 1.0, np.float32))
            for i in range(4)
        ]
        self.leases: list[Lease] = []
        self.one_sample_leases: list[tuple[int, int | None]] = []

    def _lease(self) -> Lease | None:
        reply = call(self.farm.url, "POST", f"/nodes/{self.node}/lease", self.token,
                     json_body={"wait": 0})  # fmt: skip
        self.tally.expect("lease", reply.status_code, {200, 204, 403}, reply.text)
        if reply.status_code != 200 or not reply.content or reply.json() is None:
            return None
        lease = Lease.model_validate(reply.json())
        self.leases.append(lease)
        if lease.assignment is not None and lease.job_name.startswith("one-sample"):
            self.one_sample_leases.append((lease.samples, lease.assignment.samples))
        return lease

    def _upload(self, attack: str, lease: Lease, data: bytes, sha: str | None = None) -> None:
        reply = self.farm.upload(self.token, lease.lease_id, data, sha)
        self.tally.expect(attack, reply.status_code, FOUR_XX, reply.text)

    def _live(self) -> list[tuple[str, str, str]]:
        """(task, job, bundle) of every task the coordinator's database says our nodes
        hold a live lease on (read-only, for the report)."""
        db = self.farm.coordinator.data_dir / "coordinator.sqlite"
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
            rows = conn.execute(
                "SELECT t.id, j.name, substr(j.bundle, 1, 12) FROM tasks t JOIN jobs j ON"
                " j.id = t.job_id JOIN nodes n ON n.id = t.node_id WHERE n.owner = 'eve' AND"
                " t.lease_id IS NOT NULL AND t.status = 'active'"
            ).fetchall()
        return [tuple(r) for r in rows]

    def _bundle_closed(self, lease: Lease, attack: str) -> None:
        reply = call(self.farm.url, "GET", f"/bundles/{lease.bundle}", self.token)
        live = self._live() if reply.status_code == 200 else []
        if any(bundle == lease.bundle[:12] for _, _, bundle in live):
            # another live lease of ours (an abandoned one) opens the same bundle: fair
            self.tally.note(attack, "200 (live lease on the bundle)")
            return
        why = f"bundle {lease.bundle[:12]} of lease {lease.task.id}; live leases {live}"
        self.tally.expect(attack, reply.status_code, {403, 404}, why)

    def _after(self, lease: Lease) -> None:
        """The lease is over (failed, refused or released): its bundle is closed to us."""
        info = self.farm.node_info(self.token, self.node)
        if info["current_task"] is not None:
            call(self.farm.url, "POST", f"/leases/{lease.lease_id}/release", self.token)
            info = self.farm.node_info(self.token, self.node)
        if info["current_task"] is not None:
            return  # (a new lease cannot be taken meanwhile: only this thread leases)
        self._bundle_closed(lease, "bundle_after_lease")

    def round(self, rng: random.Random) -> None:
        """Take a lease and abuse it; with nothing to lease, poke at other leases."""
        lease = self._lease()
        if lease is None:
            return rng.choice([self.heartbeats, self.heartbeats, self.old_bundles])(rng)
        abuse = rng.choice(
            [
                self.no_camera,
                self.no_camera,
                self.wrong_hash,
                self.wrong_size,
                self.bomb_upload,
                self.racing_uploads,
                self.abandon,
            ]
        )
        abuse(lease)
        if abuse != self.abandon:
            self._after(lease)
        return None

    def no_camera(self, lease: Lease) -> None:
        """A false final claim that the scene cannot be rendered, with a long text."""
        body = {"kind": "no_camera", "message": LONG_TEXT, "retryable": False}
        reply = call(self.farm.url, "POST", f"/leases/{lease.lease_id}/failure", self.token,
                     json_body=body)  # fmt: skip
        self.tally.expect("no_camera", reply.status_code, {204}, reply.text)

    def wrong_hash(self, lease: Lease) -> None:
        self._upload("wrong_hash", lease, self.wrong_exr, sha="0" * 64)

    def wrong_size(self, lease: Lease) -> None:
        self._upload("wrong_size", lease, self.wrong_exr)

    def bomb_upload(self, lease: Lease) -> None:
        self._upload("exr_bomb", lease, self.bomb)

    def racing_uploads(self, lease: Lease) -> None:
        start = threading.Barrier(4)

        def bad(i: int) -> None:
            with suppress(threading.BrokenBarrierError):
                start.wait(timeout=10)
            self._upload("racing_upload", lease, self.racing[i])

        threads = [threading.Thread(target=bad, args=(i,), name=f"race{i}") for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    def abandon(self, lease: Lease) -> None:
        """Keep the lease and go silent: it must expire and the task go to someone else."""
        self.tally.note("abandon", "held")

    def heartbeats(self, rng: random.Random) -> None:
        for _ in range(rng.randint(1, 5)):
            mine = [x.lease_id for x in self.leases[-3:]]
            lease = rng.choice([str(uuid.uuid4()), *mine])
            progress = rng.choice([0.5, 1.0, 0.0])
            reply = call(self.farm.url, "POST", f"/leases/{lease}/heartbeat", self.token,
                         json_body={"progress": progress, "message": "x" * 400})  # fmt: skip
            # 200 only for a lease this node still holds (an abandoned one)
            allowed = FOUR_XX | ({200} if lease in mine else set())
            self.tally.expect("heartbeat_random", reply.status_code, allowed, reply.text)

    def old_bundles(self, rng: random.Random) -> None:
        if not self.leases or self.farm.node_info(self.token, self.node)["current_task"]:
            return self.heartbeats(rng)  # (a lease held now opens its bundle)
        self._bundle_closed(rng.choice(self.leases), "bundle_long_after_lease")
        return None

    def attacks(self) -> list[Callable[[random.Random], None]]:
        return [self.round]


class Http:
    """Abuse of the HTTP layer: slow bodies held open, bursts on random paths."""

    def __init__(self, farm: HostileFarm, tokens: list[str], tally: Tally):
        self.farm, self.tokens, self.tally = farm, tokens, tally
        split = urlsplit(farm.url)
        self.address = (str(split.hostname), int(split.port or 0))
        self.sockets: list[socket.socket] = []
        self.opened_at = 0.0

    def slow_bodies(self, count: int = 4) -> None:
        host, port = self.address
        head = (
            "POST /api/v1/jobs HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            f"Authorization: Bearer {self.tokens[0]}\r\n"
            "Content-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{"
        ).encode()
        for _ in range(count):
            s = socket.create_connection(self.address, timeout=5)
            s.sendall(head)
            self.sockets.append(s)
        self.opened_at = time.monotonic()

    def still_open(self) -> int:
        """How many slow sockets the coordinator has neither answered nor closed (each
        read for at most a second)."""
        open_ones = 0
        for s in self.sockets:
            s.settimeout(1.0)
            try:
                answered = True
                s.recv(65536)  # b"": closed; bytes: an answer (a 408, say)
            except TimeoutError:
                answered = False
            except OSError:
                answered = True
            open_ones += not answered
        return open_ones

    def close(self) -> None:
        for s in self.sockets:
            s.close()

    def burst(self, rng: random.Random) -> None:
        token = rng.choice([*self.tokens, None])
        paths: list[Callable[[], tuple[str, str, dict[str, float] | None]]] = [
            lambda: ("POST", f"/leases/{uuid.uuid4()}/heartbeat", {"progress": 0.5}),
            lambda: ("GET", f"/jobs/{uuid.uuid4()}", None),
            lambda: ("GET", f"/{uuid.uuid4().hex}", None),
            lambda: ("GET", f"/bundles/{uuid.uuid4().hex}{uuid.uuid4().hex}", None),
            lambda: ("POST", f"/nodes/{uuid.uuid4()}/lease", {"wait": 0}),
        ]
        with requests.Session() as session:
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
            for _ in range(rng.randint(20, 80)):
                method, path, body = rng.choice(paths)()
                try:
                    reply = session.request(
                        method, f"{self.farm.url}/api/v1{path}", json=body, timeout=10
                    )
                except requests.RequestException as exc:
                    self.tally.problem(f"burst: {type(exc).__name__}")
                    continue
                self.tally.expect("burst", reply.status_code, FOUR_XX, reply.text)

    def pause(self, rng: random.Random) -> None:
        time.sleep(rng.uniform(0.5, 2.0))

    def attacks(self) -> list[Callable[[random.Random], None]]:
        return [self.burst, self.pause, self.pause]


def _attack_loop(
    name: str,
    attacks: list[Callable[[random.Random], None]],
    seed: int,
    until: float,
    tally: Tally,
    max_rounds: int = 2000,
) -> None:
    rng = random.Random(seed)
    for _ in range(max_rounds):  # bounded in count and in time
        if time.monotonic() >= until:
            return
        attack = rng.choice(attacks)
        what = getattr(attack, "__name__", repr(attack))
        try:
            attack(rng)
        except requests.RequestException as exc:
            tally.problem(f"{name}/{what}: {type(exc).__name__}: {exc}"[:300])
        except Exception as exc:  # a bug in the attack itself: report it, keep attacking
            tally.problem(f"{name}/{what} raised {type(exc).__name__}: {exc}"[:300])
        time.sleep(rng.uniform(0.02, 0.25))


def _wait_done(farm: HostileFarm, token: str, job: str, timeout: float) -> str:
    status = "unknown"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(farm, token, job)
        if status in ("completed", "failed", "canceled"):
            break
        time.sleep(0.3)
    return status


def _health(url: str) -> int | str:
    last: int | str = "no answer"
    for _ in range(20):  # the anonymous bucket may be drained by the bursts: 429 retried
        try:
            last = requests.get(f"{url}/api/v1/health", timeout=5).status_code
        except requests.RequestException as exc:
            last = type(exc).__name__
        if last == 200:
            break
        time.sleep(0.5)
    return last


def test_mixed_attacks_leave_the_farm_working_and_the_honest_unharmed(
    tmp_path: Path, demo_scene: Path
) -> None:
    started = time.monotonic()
    bomb = exr_bomb(tmp_path / "bomb.exr")
    _, demo_sha = make_bundle(demo_scene, tmp_path / "demo-bundle")
    demo_zip = (tmp_path / "demo-bundle" / "bundle.zip").read_bytes()
    black = black_scene(demo_scene, tmp_path / "black.blend")
    _, black_sha = make_bundle(black, tmp_path / "black-bundle")
    black_zip = (tmp_path / "black-bundle" / "bundle.zip").read_bytes()
    options = ("--no-verification", "--lease-seconds", "6", "--heartbeat-interval", "1")
    # a high --suspend-after keeps the hostile provider attacking the whole time; the
    # honest provider's `rejected` must stay 0 anyway
    with hostile_farm(tmp_path / "c", *options, "--suspend-after", "1000") as farm:
        artist = farm.account("artist", "requester")
        mallory = farm.account("mallory", "requester")
        honest = farm.account("honest", "provider")
        eve = farm.account("eve", "provider")
        for name in ("artist", "mallory"):
            reply = call(farm.url, "POST", f"/accounts/{name}/grant", farm.admin,
                         json_body={"amount": 500})  # fmt: skip
            assert reply.status_code == 200, reply.text
        assert farm.upload_bundle(artist, demo_zip) == demo_sha
        shas = {
            "demo": farm.upload_bundle(mallory, demo_zip),
            "black": farm.upload_bundle(mallory, black_zip),
            "fake": farm.upload_bundle(mallory),
        }
        assert shas["black"] == black_sha
        tally = Tally()
        with real_node(farm.url, honest, tmp_path / "node") as node:

            def honest_node() -> dict[str, Any] | None:
                nodes = call(farm.url, "GET", "/nodes", farm.admin).json()
                return next((n for n in nodes if n["owner"] == "honest"), None)

            assert wait_until(lambda: honest_node() is not None, 60), node.tail()
            before = honest_node()
            assert before is not None
            requester = Requester(farm, mallory, tally, shas)
            provider = Provider(farm, eve, tally, tmp_path / "eve", bomb)
            http = Http(farm, [mallory, eve], tally)
            honest_jobs = [farm.submit(artist, demo_spec(demo_sha, "honest-a", (1, 3),
                                                         max_price=5.0))]  # fmt: skip
            http.slow_bodies()
            rss_before = rss_peak_kb(farm.coordinator.process.pid)
            until = time.monotonic() + SECONDS
            threads = [
                threading.Thread(target=_attack_loop, name=f"attack-{name}",
                                 args=(name, attacks, SEED + i, until, tally))
                for i, (name, attacks) in enumerate(
                    (("requester", requester.attacks()), ("provider", provider.attacks()),
                     ("http", http.attacks()))
                )
            ]  # fmt: skip
            for t in threads:
                t.start()
            try:
                time.sleep(min(SECONDS / 3, 20))
                honest_jobs.append(
                    farm.submit(artist, demo_spec(demo_sha, "honest-b", (5, 6), max_price=5.0))
                )
            finally:
                for t in threads:
                    t.join(SECONDS + 120)
            assert not any(t.is_alive() for t in threads), "an attack loop did not stop"
            slow_open = http.still_open() if time.monotonic() - http.opened_at > 30 else 0
            http.close()
            attacked = time.monotonic()

            # --- after the attacks -----------------------------------------------------------
            assert farm.coordinator.process.poll() is None, "the coordinator died"
            assert _health(farm.url) == 200, "/health does not answer"
            after_job = farm.submit(artist, demo_spec(demo_sha, "honest-after", (4, 4),
                                                      max_price=5.0))  # fmt: skip
            statuses = {job: _wait_done(farm, artist, job, 90) for job in honest_jobs}
            statuses[after_job] = _wait_done(farm, artist, after_job, 90)
            finished = time.monotonic()
            problems = [f"honest job {j}: {s}" for j, s in statuses.items() if s != "completed"]
            done_then = {  # every job that completed, whoever's, and its accepted tiles
                j["id"]: j["status"]
                for j in call(farm.url, "GET", "/jobs", farm.admin).json()
                if j["status"] == "completed"
            }
            tiles_then = {
                job: {t["id"]: t["result_sha256"]
                      for t in call(farm.url, "GET", f"/jobs/{job}/tasks", artist).json()
                      if t["status"] == "completed"}
                for job in statuses
            }  # fmt: skip
            honest_id = before["id"]
            for job, status in statuses.items():
                if status != "completed":
                    continue
                tasks = call(farm.url, "GET", f"/jobs/{job}/tasks", artist).json()
                for task in tasks:
                    if task["kind"] == "render" and task["node"] not in (honest_id, None):
                        problems.append(f"job {job}: task {task['id']} by node {task['node']}")
                frames = call(farm.url, "GET", f"/jobs/{job}/frames", artist).json()
                for frame in frames:
                    reply = call(farm.url, "GET", f"/jobs/{job}/frames/{frame['frame']}.exr",
                                 artist)  # fmt: skip
                    if reply.status_code != 200:
                        problems.append(f"job {job} frame {frame['frame']}: {reply.status_code}")
                        continue
                    problems += check_frame(
                        reply.content, tmp_path, f"{job}-{frame['frame']}.exr", SIZE
                    )
            after = honest_node()
            assert after is not None
        rss_after = rss_peak_kb(farm.coordinator.process.pid)
        ledger = call(farm.url, "GET", "/ledger/check", farm.admin)
        jobs_now = {j["id"]: j["status"] for j in call(farm.url, "GET", "/jobs", farm.admin).json()}
        lost = {j: jobs_now.get(j) for j in done_then if jobs_now.get(j) != "completed"}
        tiles_now = {
            job: {t["id"]: t["result_sha256"]
                  for t in call(farm.url, "GET", f"/jobs/{job}/tasks", artist).json()
                  if t["status"] == "completed"}
            for job in statuses
        }  # fmt: skip
        alive = farm.coordinator.process.poll() is None
        mallory_jobs = {j: _status(farm, mallory, j) for j in requester.jobs}
    report = (
        f"attacks {SECONDS:.0f}s, setup {attacked - started - SECONDS:.0f}s, honest jobs"
        f" after {finished - attacked:.0f}s; coordinator peak RSS {rss_before // 1024}"
        f" -> {rss_after // 1024} MB; hostile requester's jobs {mallory_jobs};"
        f" eve's one-sample leases (lease.samples, assignment.samples)"
        f" {provider.one_sample_leases}; replies {tally.summary()}"
    )
    print(report)
    print("node log tail:\n" + node.tail(2000))
    if slow_open:
        problems.append(f"{slow_open} of {len(http.sockets)} slow bodies still open after 30 s")
    problems += [f"attack: {p}" for p in tally.problems]
    problems += [
        f"one-sample lease states {s}/{a} samples, not 1"
        for s, a in provider.one_sample_leases
        if s != 1 or a != 1
    ]
    assert alive, "the coordinator died at the end"
    assert after["suspended"] is None, f"the honest provider was suspended: {after['suspended']}"
    assert after["rejected"] == 0, f"the honest provider has {after['rejected']} rejections"
    assert after["reputation"] >= before["reputation"], (
        f"the honest provider's reputation fell {before['reputation']} -> {after['reputation']}"
    )
    assert ledger.status_code == 200 and ledger.json()["ok"], ledger.text
    assert not lost, f"completed jobs no longer completed: {lost}"
    assert tiles_now == tiles_then, "accepted tiles changed after their jobs completed"
    assert not problems, "\n".join(problems) + "\n" + report


def test_a_colluding_pair_cannot_get_an_honest_node_penalised_for_a_true_report(
    tmp_path: Path,
) -> None:
    """A hostile requester submits a scene that cannot be rendered (a fake .blend); the
    honest node truthfully reports it; a hostile provider then "renders" the task with
    made-up pixels of the right size. That upload must not count as contradicting the
    honest node's true report (it costs the honest provider a rejection, and three of
    them suspend it at the default --suspend-after 3)."""
    with hostile_farm(tmp_path / "c", "--no-verification", "--lease-seconds", "6") as farm:
        mallory = farm.account("mallory", "requester")
        honest = farm.account("honest", "provider")
        eve = farm.account("eve", "provider")
        call(farm.url, "POST", "/accounts/mallory/grant", farm.admin, json_body={"amount": 50})
        fake = farm.upload_bundle(mallory)
        eve_node = farm.node(eve, "eve-box")
        outcomes = []
        with real_node(farm.url, honest, tmp_path / "node") as node:

            def honest_info() -> dict[str, Any] | None:
                nodes = call(farm.url, "GET", "/nodes", farm.admin).json()
                return next((n for n in nodes if n["owner"] == "honest"), None)

            assert wait_until(lambda: honest_info() is not None, 60), node.tail()
            for n in range(3):  # bounded: three rounds
                job = farm.submit(
                    mallory, spec(fake, f"trap-{n}", tiles={"columns": 1, "rows": 1},
                                  max_price=2.0)
                )  # fmt: skip

                def reported(job: str = job) -> bool:
                    tasks = call(farm.url, "GET", f"/jobs/{job}/tasks", mallory).json()
                    return (
                        bool(tasks)
                        and tasks[0]["attempts"] >= 1
                        and tasks[0]["status"] in ("queued", "soft-failed", "failed")
                    )

                assert wait_until(reported, 30), node.tail()
                lease = None
                for _ in range(50):  # bounded: 10 s
                    lease = farm.lease(eve, eve_node)
                    if lease is not None:
                        break
                    time.sleep(0.2)
                if lease is None or lease.assignment is None:
                    outcomes.append(f"trap-{n}: eve got no lease ({_status(farm, mallory, job)})")
                    continue
                r = lease.assignment.render_region
                made_up = np.full((r.y1 - r.y0, r.x1 - r.x0, 4), 0.5, np.float32)
                reply = farm.upload(
                    eve, lease.lease_id, write_tile_exr(tmp_path / "m.exr", made_up)
                )
                outcomes.append(f"trap-{n}: eve's upload {reply.status_code},"
                                f" job {_status(farm, mallory, job)}")  # fmt: skip
            after = honest_info()
            assert after is not None
        print(outcomes, node.tail(1500))
        assert after["suspended"] is None, f"honest provider suspended: {after['suspended']}"
        assert after["rejected"] == 0, (
            f"the honest node's true reports cost it {after['rejected']} rejections: {outcomes}"
        )
