"""What an upload costs the coordinator's store: one write (spool, then adopt by rename)
against the two writes it used to make (spool, then copy into the store).

Streams a bundle-sized body (256 MiB; `--quick`: 32 MiB) in the chunks the HTTP layer
hands over, best of N each:

- the floor: writing the body once to a file, hashing it on the way (what any upload
  must cost);
- the store: `ContentStore.put_stream`, as the coordinator stores a bundle or a result;
- the old way: the same spool, then a copy into the store (what it did before).

Goal: the store within 1.1x of the floor. Run from the repository root:
`python -m benchmarks.bench_upload [--quick] [--repeats N]`. This script must not be
imported by the product code.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.common import report
from coordinator.store import ContentStore

CHUNK = 1 << 20
GOAL_RATIO = 1.1


def _chunks(total: int) -> Iterator[bytes]:
    block = os.urandom(CHUNK)
    for _ in range(total // CHUNK):
        yield block


def _floor(folder: Path, total: int) -> None:
    digest = hashlib.sha256()
    with (folder / "floor.bin").open("wb") as handle:
        for chunk in _chunks(total):
            digest.update(chunk)
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    (folder / "floor.bin").unlink()


def _store(folder: Path, total: int) -> None:
    store = ContentStore(folder / "store")
    sha, _ = store.put_stream(_chunks(total), max_bytes=1 << 40)
    os.sync()
    store.path(sha).unlink()


def _spool_and_copy(folder: Path, total: int) -> None:
    store = ContentStore(folder / "old")
    upload = store.spool_chunks(_chunks(total), max_bytes=1 << 40)
    target = store.path(upload.sha256)
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(upload.path, target)
    upload.path.unlink()
    os.sync()
    target.unlink()


def _best(step: Callable[[Path, int], None], folder: Path, total: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step(folder, total)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB instead of 256 MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    total = (32 if args.quick else 256) << 20
    with tempfile.TemporaryDirectory(prefix="tessera-bench-upload-") as name:
        folder = Path(name)
        floor = _best(_floor, folder, total, args.repeats)
        store = _best(_store, folder, total, args.repeats)
        old = _best(_spool_and_copy, folder, total, args.repeats)
    ratio = store / floor
    rows: list[dict[str, object]] = [
        {"step": "write once + hash (floor)", "seconds": round(floor, 3), "ratio": 1.0},
        {
            "step": "store: spool + adopt (one write)",
            "seconds": round(store, 3),
            "ratio": round(ratio, 3),
            "goal": f"<= {GOAL_RATIO}x",
            "met": ratio <= GOAL_RATIO,
        },
        {
            "step": "before: spool + copy (two writes)",
            "seconds": round(old, 3),
            "ratio": round(old / floor, 3),
        },
    ]
    rows[0]["mib"] = total >> 20
    report(
        "upload_quick" if args.quick else "upload",
        rows,
        ["step", "seconds", "ratio", "goal", "met", "mib"],
    )
    return 0 if ratio <= GOAL_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
