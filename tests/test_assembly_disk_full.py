"""A disk that fills up while a frame is being assembled delays the job, never fails it.

A real full disk, without root and without touching the machine's disks: the scenario
runs in a child process in its own user and mount namespaces (`unshare -rm`), where the
coordinator's content store is a 2 MiB tmpfs. The child fills that tmpfs until the
kernel says ENOSPC, leaves room for the last tile but not for the merged frame, and
uploads the tile: the upload is accepted, the frame cannot be written, and the job must
stay active with the reason in its message. Once the filler is deleted, the frame is
assembled on the next retry, equals the true pixels, and the ledger balances.
Skipped where the kernel refuses unprivileged namespaces.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.farm_tools import REPO

TMPFS_BYTES = 2 << 20

_SCENARIO = r"""
import json, sys, time
from pathlib import Path

import numpy as np

from coordinator import ledger
from coordinator.assembly import Assembler
from coordinator.farm import Principal
from coordinator.verify.policy import VerificationPolicy
from protocol.client import sha256_file
from protocol.models import LeaseRequest, Role
from renderers.exr import read_exr
from tests.coordinator_tools import open_farm
from tests.inprocess_farm import TRUTH, setup_farm, small_spec, write_tile_exr

data, scene, scratch = (Path(arg) for arg in sys.argv[1:4])
farm = open_farm(data, verification=VerificationPolicy(enabled=False), min_free_disk=0)
db, store = farm.db, farm.store
assembler = Assembler(farm.states, retry_seconds=0.3)
farm.on_frame_ready.append(assembler.submit)
assembler.start()
job_id, nodes = setup_farm(farm, small_spec(), scene, scratch / "bundle")
who = [Principal("a", Role.PROVIDER), Principal("b", Role.PROVIDER)]

def upload(i):
    lease = farm.try_lease(who[i], nodes[i], LeaseRequest(wait=0))
    r = lease.assignment.render_region
    tile = write_tile_exr(scratch / f"tile{i}.exr", TRUTH[r.y0 : r.y1, r.x0 : r.x1])
    receipt = farm.accept_result(
        who[i], lease.lease_id, sha256_file(tile), iter([tile.read_bytes()])
    )
    return receipt.accepted, tile.stat().st_size

def job():
    return db.query_one("SELECT status, message FROM jobs WHERE id = ?", (job_id,))

def wait(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)
    return predicate()

first, tile_bytes = upload(0)
filler = store.root / "filler"
with filler.open("wb", buffering=0) as out:  # fill the tmpfs until the kernel refuses
    try:
        while True:
            out.write(b"\0" * 4096)
    except OSError as exc:
        full_errno = exc.errno
with filler.open("r+b") as out:  # room for the tile and its temporary copy, not the frame
    out.truncate(filler.stat().st_size - 2 * tile_bytes - 16384)
second, _ = upload(1)
waiting = wait(lambda: "waits for disk space" in job()["message"], 10)
while_full = dict(job())
filler.unlink()
completed = wait(lambda: job()["status"] == "completed", 10)
frame = db.query_one("SELECT exr_sha FROM frames WHERE job_id = ?", (job_id,))
image = read_exr(store.path(frame["exr_sha"])) if frame["exr_sha"] else None
exact = image is not None and bool(np.array_equal(image.combined_rgba(), TRUTH))
assembler.stop()
print(json.dumps({
    "full_errno": full_errno, "accepted": [first, second], "waiting": waiting,
    "while_full": while_full, "completed": completed, "exact": exact,
    "ledger": ledger.check(db),
}))
"""


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


@pytest.mark.skipif(not _namespaces_work(), reason="no unprivileged user+mount namespaces")
def test_a_full_disk_during_assembly_delays_the_frame_and_loses_nothing(
    demo_scene: Path, tmp_path: Path
) -> None:
    data, scratch = tmp_path / "coordinator", tmp_path / "scratch"
    store = data / "store"
    store.mkdir(parents=True)
    scratch.mkdir()
    script = f'mount -t tmpfs -o size={TMPFS_BYTES} tmpfs "$1" && shift && exec "$@"'
    done = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            script,
            "sh",
            str(store),
            sys.executable,
            "-c",
            _SCENARIO,
            str(data),
            str(demo_scene),
            str(scratch),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["full_errno"] == 28, "the tmpfs did not fill up (ENOSPC)"
    assert result["accepted"] == [True, True], "the last tile did not fit: adjust the room"
    assert result["waiting"], f"the job did not wait for room: {result['while_full']}"
    assert result["while_full"]["status"] == "active"
    assert result["completed"], "the frame was not assembled once there was room"
    assert result["exact"], "the assembled frame differs from the tiles"
    assert result["ledger"] == []
    assert "waits for disk space" in done.stderr  # the coordinator's log says so too
