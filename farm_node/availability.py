"""When a node may render: idle-only and scheduled providing, and a GPU temperature cap.

A provider chooses a `ProvidePolicy`: render ``always``, only while the machine is
``idle`` (no keyboard or mouse input for `idle_after` seconds and the GPU not busy with
someone else's work), or only in chosen ``hours`` (local time, e.g. 22-7 across
midnight). Whatever the choice, `gpu_temp_max` pauses rendering while a GPU is hotter
than the cap, until it has cooled 5 °C below it.

The module has three layers, in the rqd "nimby" habit:

- plain data (`ProvidePolicy`, `MachineState`, `Availability`) and the pure `decide`,
  which turns a policy and one set of readings into "may render / paused, because...";
- impure probes that degrade to "unknown" (None) instead of failing: the input idle time
  (``xprintidle`` on X11, else logind's idle hint of the active graphical sessions), the
  GPU utilisation and temperature (NVML through `renderers.devices.nvml_snapshot`), or a
  small JSON *machine state file* that replaces all of them (tests and user scripts);
- `AvailabilityTracker`, which the node daemon owns: it probes, decides and remembers the
  previous answer (the temperature hysteresis needs it). Thread-safe.

Unknown readings: when the input idle time cannot be read (a headless machine, Wayland
without a logind idle hint), ``idle`` relies on the GPU alone; when the GPU cannot be
read either, the machine counts as idle (nobody can be seen using it). A GPU reading is
ignored while the node itself renders on the GPU (its own load is not the user's).

This module never imports Blender, Qt or the network, and reads no environment or
settings at import time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from common.errors import UsageError

__all__ = [
    "COOL_DOWN",
    "PROVIDE_MODES",
    "Availability",
    "AvailabilityTracker",
    "MachineState",
    "ProvidePolicy",
    "decide",
    "format_hours",
    "parse_hours",
    "parse_idle_hint",
    "probe_gpu",
    "probe_input_idle",
    "probe_machine",
    "read_state_file",
]

log = logging.getLogger(__name__)

#: What `ProvidePolicy.when` may be.
PROVIDE_MODES = ("always", "idle", "hours")
#: Degrees (°C) a GPU that hit the cap must cool below it before rendering resumes.
COOL_DOWN = 5.0
#: Longest a probe command may take (a hung loginctl must not stall the node).
_PROBE_TIMEOUT = 2.0
_HOURS = re.compile(r"^\s*(\d{1,2})(?::00)?\s*[-–]\s*(\d{1,2})(?::00)?\s*$")


@dataclass(frozen=True)
class ProvidePolicy:
    """When this node may render.

    `when`: "always", "idle" or "hours". `hours`: (start, end) hours of local time for
    "hours" (start inclusive, end exclusive; may wrap midnight, e.g. (22, 7)).
    `idle_after`: seconds without keyboard or mouse input before the machine counts as
    idle. `gpu_busy_above`: GPU utilisation (%) by other programs above which the user
    counts as busy ("idle" only). `gpu_temp_max`: °C above which rendering pauses, in
    every mode, until the GPU is `COOL_DOWN` degrees below; None = no cap.
    """

    when: str = "always"
    hours: tuple[int, int] | None = None
    idle_after: float = 300.0
    gpu_busy_above: float = 30.0
    gpu_temp_max: float | None = None

    def problems(self) -> list[str]:
        """What is wrong with these settings, each naming its option; [] when fine."""
        found: list[str] = []
        if self.when not in PROVIDE_MODES:
            found.append(f"--when must be one of {', '.join(PROVIDE_MODES)}, not {self.when!r}")
        if self.when == "hours" and self.hours is None:
            found.append("--when hours needs --hours START-END (e.g. --hours 22-7)")
        if self.hours is not None:
            start, end = self.hours
            if not (0 <= start <= 23 and 0 <= end <= 24) or start == end:
                found.append(
                    f"--hours {start}-{end} is not a range of hours: START is 0 to 23, END "
                    "0 to 24, and they differ"
                )
        if not (math.isfinite(self.idle_after) and self.idle_after >= 0):
            found.append(f"--idle-after must be 0 seconds or more, not {self.idle_after}")
        if not (math.isfinite(self.gpu_busy_above) and 0 <= self.gpu_busy_above <= 100):
            found.append(f"--gpu-busy-above must be 0 to 100 %, not {self.gpu_busy_above}")
        if self.gpu_temp_max is not None and not (
            math.isfinite(self.gpu_temp_max) and 30 <= self.gpu_temp_max <= 120
        ):
            found.append(f"--gpu-temp-max must be 30 to 120 °C, not {self.gpu_temp_max}")
        return found

    def validate(self) -> None:
        """Raise `UsageError` naming every bad option."""
        found = self.problems()
        if found:
            raise UsageError("Invalid providing policy: " + "; ".join(found) + ".")

    @property
    def needs_input(self) -> bool:
        return self.when == "idle"

    @property
    def needs_gpu(self) -> bool:
        return self.when == "idle" or self.gpu_temp_max is not None

    def describe(self) -> str:
        """One line for logs and the app: what this policy does."""
        if self.when == "idle":
            text = (
                f"only while idle (no input for {self.idle_after:g} s, GPU below "
                f"{self.gpu_busy_above:g} %)"
            )
        elif self.when == "hours" and self.hours is not None:
            text = f"only {format_hours(self.hours)} local time"
        else:
            text = "always"
        if self.gpu_temp_max is not None:
            text += f", paused above {self.gpu_temp_max:g} °C"
        return text


def parse_hours(text: str) -> tuple[int, int]:
    """``"22-7"`` -> (22, 7); raises `UsageError` saying what is accepted."""
    match = _HOURS.match(text)
    if match is None:
        raise UsageError(
            f"--hours {text!r} is not START-END in whole hours (e.g. 22-7 or 9-17).",
            hint="Hours are local time, 0 to 24; START-END may wrap midnight.",
        )
    hours = (int(match.group(1)), int(match.group(2)))
    problems = ProvidePolicy(hours=hours).problems()
    if problems:
        raise UsageError(problems[0] + ".")
    return hours


def format_hours(hours: tuple[int, int]) -> str:
    return f"{hours[0]:02d}:00–{hours[1]:02d}:00"


@dataclass(frozen=True)
class MachineState:
    """One set of readings; None = unknown.

    `input_idle_seconds`: since the last keyboard or mouse input. `gpu_utilisation`: %,
    the busiest GPU. `gpu_temperature`: °C, the hottest GPU. `node_on_gpu`: the node is
    rendering on the GPU right now (so the utilisation is partly its own and is not
    counted against the user). `problem`: a probe that must not be guessed failed (an
    unreadable machine state file): rendering pauses, naming it.
    """

    input_idle_seconds: float | None
    gpu_utilisation: float | None
    gpu_temperature: float | None
    now: datetime
    node_on_gpu: bool = False
    problem: str | None = None


@dataclass(frozen=True)
class Availability:
    """May the node render now, and why (or why not) in plain words.

    `cause` is a stable key for "the same reason" ("" when rendering is allowed, else
    "user", "gpu-busy", "hours", "hot", "cooling", "state" or "disk"), so a caller logs
    a change once rather than every reading.
    """

    ok: bool
    reason: str
    cause: str = ""

    @property
    def cooling(self) -> bool:
        return self.cause in ("hot", "cooling")


def _in_hours(hours: tuple[int, int], now: datetime) -> bool:
    start, end = hours
    hour = now.hour
    if start < end:
        return start <= hour < end
    return hour >= start or hour < end  # wraps midnight


def decide(
    policy: ProvidePolicy, state: MachineState, previous: Availability | None = None
) -> Availability:
    """Whether the node may render, given `policy` and one set of readings. Pure.

    `previous` (the last answer) carries the temperature hysteresis: a GPU that went
    over the cap stays paused until it is `COOL_DOWN` degrees below it.
    """
    if state.problem is not None:
        return Availability(False, f"paused: {state.problem}", "state")
    cap, temperature = policy.gpu_temp_max, state.gpu_temperature
    if cap is not None and temperature is not None:
        if temperature > cap:
            return Availability(False, f"paused: GPU at {temperature:g} °C, cap {cap:g} °C", "hot")
        resume_below = cap - COOL_DOWN
        if previous is not None and previous.cooling and temperature >= resume_below:
            return Availability(
                False,
                f"paused: GPU cooling down ({temperature:g} °C, resumes below {resume_below:g} °C)",
                "cooling",
            )
    if policy.when == "hours" and policy.hours is not None:
        if not _in_hours(policy.hours, state.now):
            return Availability(
                False, f"paused: outside hours {format_hours(policy.hours)}", "hours"
            )
        return Availability(True, f"rendering: within hours {format_hours(policy.hours)}")
    if policy.when != "idle":
        return Availability(True, "rendering: always on")
    idle = state.input_idle_seconds
    if idle is not None and idle < policy.idle_after:
        return Availability(
            False,
            f"paused: the user is active (input {idle:.0f} s ago, idle after "
            f"{policy.idle_after:g} s)",
            "user",
        )
    usage = None if state.node_on_gpu else state.gpu_utilisation
    if usage is not None and usage > policy.gpu_busy_above:
        return Availability(
            False,
            f"paused: the GPU is busy with other work ({usage:g} %, limit "
            f"{policy.gpu_busy_above:g} %)",
            "gpu-busy",
        )
    if idle is not None:
        return Availability(True, f"rendering: the machine is idle (no input for {idle:.0f} s)")
    if usage is not None:
        return Availability(True, "rendering: the GPU is quiet (user input cannot be seen here)")
    return Availability(
        True, "rendering: no user activity can be seen here (no input idle time, no GPU reading)"
    )


# --- probes -------------------------------------------------------------------------------


def read_state_file(path: Path, now: datetime) -> MachineState:
    """Readings from a JSON machine state file (keys ``input_idle_seconds``,
    ``gpu_utilisation``, ``gpu_temperature``; missing or null = unknown).

    A file that is missing or unreadable gives a state with `problem` set: the caller
    pauses rather than guess.
    """
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, Mapping):
            raise ValueError("not a JSON object")
        readings = [
            _reading(data, key)
            for key in ("input_idle_seconds", "gpu_utilisation", "gpu_temperature")
        ]
    except (OSError, ValueError) as exc:
        return MachineState(
            None, None, None, now, problem=f"cannot read the machine state file {path} ({exc})"
        )
    return MachineState(readings[0], readings[1], readings[2], now)


def _reading(data: Mapping[str, object], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number or null, not {value!r}")
    return float(value)


def parse_idle_hint(properties: str, now_us: int) -> float | None:
    """Seconds idle from ``loginctl show-session -p IdleHint -p IdleSinceHint`` output.

    ``IdleHint=no`` means the session's desktop saw input within its own idle delay: 0.
    ``IdleHint=yes`` with ``IdleSinceHint`` (µs since the epoch) gives the time since.
    Pure; None when the output says neither.
    """
    values: dict[str, str] = {}
    for line in properties.splitlines():
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    hint = values.get("IdleHint")
    if hint == "no":
        return 0.0
    if hint != "yes":
        return None
    try:
        since = int(values.get("IdleSinceHint", ""))
    except ValueError:
        return None
    if since <= 0:
        return None
    return max(0.0, (now_us - since) / 1e6)


def _run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str | None:
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
            env=None if env is None else dict(env),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def probe_input_idle(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds since the last keyboard or mouse input, None when it cannot be seen.

    X11 (``DISPLAY`` set and ``xprintidle`` installed): the X server's idle time. Else
    logind: the least idle of the active graphical sessions (their desktops set the idle
    hint; Wayland desktops included). `env` defaults to this process's environment,
    read when called.
    """
    env = os.environ if env is None else env
    search = env.get("PATH")
    if env.get("DISPLAY") and shutil.which("xprintidle", path=search):
        out = _run(["xprintidle"], env)
        if out is not None and out.strip().isdigit():
            return int(out.strip()) / 1000.0
    if shutil.which("loginctl", path=search) is None:
        return None
    sessions = _run(["loginctl", "list-sessions", "--no-legend"])
    if not sessions:
        return None
    found: list[float] = []
    for line in sessions.splitlines():
        fields = line.split()
        if not fields:
            continue
        props = _run(
            [
                "loginctl",
                "show-session",
                fields[0],
                "-p",
                "Type",
                "-p",
                "Active",
                "-p",
                "IdleHint",
                "-p",
                "IdleSinceHint",
            ]
        )
        if props is None or "Active=yes" not in props:
            continue
        if not any(f"Type={kind}" in props for kind in ("x11", "wayland", "mir")):
            continue
        idle = parse_idle_hint(props, int(datetime.now().timestamp() * 1e6))
        if idle is not None:
            found.append(idle)
    return min(found) if found else None


def probe_gpu() -> tuple[float | None, float | None]:
    """(utilisation %, temperature °C) of the busiest and hottest NVIDIA GPU; (None,
    None) without one (NVML degrades with one warning)."""
    from renderers.devices import nvml_snapshot, parse_nvml_snapshot

    gpus = parse_nvml_snapshot(nvml_snapshot())
    usage = [gpu.utilization_percent for gpu in gpus if gpu.utilization_percent is not None]
    heat = [gpu.temperature_c for gpu in gpus if gpu.temperature_c is not None]
    return (float(max(usage)) if usage else None, float(max(heat)) if heat else None)


def probe_machine(
    policy: ProvidePolicy,
    state_file: Path | None = None,
    *,
    node_on_gpu: bool = False,
    now: datetime | None = None,
) -> MachineState:
    """The readings `policy` needs (and no others): from `state_file` when given, else
    from this machine's probes."""
    now = now or datetime.now()
    if state_file is not None:
        state = read_state_file(state_file, now)
    else:
        idle = probe_input_idle() if policy.needs_input else None
        usage, temperature = probe_gpu() if policy.needs_gpu else (None, None)
        state = MachineState(idle, usage, temperature, now)
    if node_on_gpu:
        state = MachineState(
            state.input_idle_seconds,
            state.gpu_utilisation,
            state.gpu_temperature,
            state.now,
            node_on_gpu=True,
            problem=state.problem,
        )
    return state


Probe = Callable[[bool], MachineState]


class AvailabilityTracker:
    """Probes and decides, remembering the last answer (for the temperature hysteresis).

    `check(rendering)` is thread-safe: the node's loop asks before each lease and its
    heartbeat thread every second while a task runs. A policy of "always" without a
    temperature cap never probes anything.
    """

    def __init__(
        self,
        policy: ProvidePolicy,
        state_file: Path | None = None,
        *,
        renders_on_gpu: bool = False,
        probe: Probe | None = None,
    ) -> None:
        self.policy = policy
        self.state_file = state_file
        self.renders_on_gpu = renders_on_gpu
        self._probe = probe
        self._lock = threading.Lock()
        self._last: Availability | None = None

    @property
    def active(self) -> bool:
        """Whether anything can ever pause this node (else `check` is always ok)."""
        return (
            self.state_file is not None
            or self.policy.when != "always"
            or (self.policy.gpu_temp_max is not None)
        )

    @property
    def last(self) -> Availability | None:
        return self._last

    def check(self, rendering: bool = False) -> Availability:
        """Whether the node may render now; `rendering`: a task of this node is running."""
        if not self.active:
            return Availability(True, "rendering: always on")
        node_on_gpu = rendering and self.renders_on_gpu
        if self._probe is not None:
            state = self._probe(node_on_gpu)
        else:
            state = probe_machine(self.policy, self.state_file, node_on_gpu=node_on_gpu)
        with self._lock:
            answer = decide(self.policy, state, self._last)
            self._last = answer
        return answer
