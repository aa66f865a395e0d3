"""The scene probe's benchmark side, remembered per machine in `$TESSERA_HOME`.

Every probe compares the scene's render speed with the benchmark scene's
(`renderers.scene_probe`), and the benchmark scene is the same file every time: on one
machine, with one Blender build and device, its figure changes only with the machine's
load. `BenchmarkMemo` keeps that figure in `$TESSERA_HOME/probe-benchmark.json`, keyed
by Blender version and build, device, CPU model and core count, so that only the first
probe on a machine renders the benchmark scene and later ones render only the scene.

The probe's cost is the job's *estimate* (the escrow held at submit); the bill follows
the renders the providers measure (coordinator/billing.py), so a remembered figure
moves only the estimate. An unreadable file is ignored (the figure is measured again)
and a file that cannot be written costs only the saving.

This module only reads and writes that file: no Blender, no network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from common.json_files import read_json_object, write_json_atomically
from farm_node.hardware import CPUINFO, parse_cpuinfo, read_proc_file
from renderers.builds import BlenderBuild

log = logging.getLogger(__name__)

MEMO_FILE = "probe-benchmark.json"


class BenchmarkMemo(MutableMapping[str, float]):
    """The benchmark scene's seconds per pixel-sample on this machine, by the probe's key
    (its pixel count), for one Blender build and device; stored as it changes."""

    def __init__(self, home: Path, build: BlenderBuild, device: str = "CPU") -> None:
        self.path = home / MEMO_FILE
        model = parse_cpuinfo(read_proc_file(CPUINFO))[0]
        self.machine = " | ".join(
            (build.version, build.build_hash, device.upper(), model, f"{os.cpu_count()} cpus")
        )
        self._all = read_json_object(self.path, "probe memo")
        entry = self._all.get(self.machine)
        self._mine: dict[str, float] = {
            key: float(value)
            for key, value in (entry.items() if isinstance(entry, dict) else ())
            if isinstance(value, int | float) and value > 0
        }

    def __getitem__(self, key: str) -> float:
        return self._mine[key]

    def __setitem__(self, key: str, value: float) -> None:
        self._mine[key] = float(value)
        self._all[self.machine] = dict(self._mine)
        try:
            write_json_atomically(self.path, self._all)
        except OSError as exc:
            log.warning("Could not remember the probe's benchmark figure (%s)", exc)

    def __delitem__(self, key: str) -> None:
        del self._mine[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mine)

    def __len__(self) -> int:
        return len(self._mine)
