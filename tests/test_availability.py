"""When a node may render: the pure `decide` table (idle, hours across midnight, the GPU
temperature cap and its hysteresis), option parsing and validation, the machine state
file, and the probes' degradation on a machine without a display or NVIDIA GPU."""

from __future__ import annotations

import argparse
import errno
import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from app.cli import build_parser
from app.cli import main as cli_main
from app.cli.node_limits import providing, render_limits
from app.cli.options import byte_size
from common.errors import UsageError
from farm_node.availability import (
    Availability,
    AvailabilityTracker,
    MachineState,
    ProvidePolicy,
    decide,
    parse_hours,
    parse_idle_hint,
    probe_input_idle,
    probe_machine,
    read_state_file,
)
from renderers.worker import RenderLimits

NIGHT = datetime(2026, 11, 26, 23, 30)
MORNING = datetime(2026, 11, 26, 6, 59)
DAY = datetime(2026, 11, 26, 12, 0)
SEVEN = datetime(2026, 11, 26, 7, 0)


def state(
    idle: float | None = None,
    gpu: float | None = None,
    temp: float | None = None,
    now: datetime = DAY,
    on_gpu: bool = False,
) -> MachineState:
    return MachineState(idle, gpu, temp, now, node_on_gpu=on_gpu)


IDLE = ProvidePolicy(when="idle", idle_after=300, gpu_busy_above=30)
NIGHTS = ProvidePolicy(when="hours", hours=(22, 7))
OFFICE = ProvidePolicy(when="hours", hours=(9, 17))
HOT = ProvidePolicy(gpu_temp_max=83)


@pytest.mark.parametrize(
    ("policy", "readings", "ok", "reason"),
    [
        (ProvidePolicy(), state(idle=0, gpu=100, temp=99), True, "rendering: always on"),
        (IDLE, state(idle=3), False, "paused: the user is active (input 3 s ago"),
        (IDLE, state(idle=299.6), False, "the user is active"),
        (IDLE, state(idle=300), True, "rendering: the machine is idle (no input for 300 s)"),
        (IDLE, state(idle=900, gpu=31), False, "paused: the GPU is busy with other work (31 %"),
        (IDLE, state(idle=900, gpu=30), True, "the machine is idle"),
        # The node's own GPU render is not the user's load; input still counts.
        (IDLE, state(idle=900, gpu=100, on_gpu=True), True, "the machine is idle"),
        (IDLE, state(idle=1, gpu=100, on_gpu=True), False, "the user is active"),
        # Input unknown (headless, Wayland without an idle hint): the GPU decides.
        (IDLE, state(gpu=5), True, "rendering: the GPU is quiet"),
        (IDLE, state(gpu=95), False, "the GPU is busy"),
        (IDLE, state(), True, "no user activity can be seen here"),
        (NIGHTS, state(now=NIGHT), True, "rendering: within hours 22:00–07:00"),
        (NIGHTS, state(now=MORNING), True, "within hours"),
        (NIGHTS, state(now=SEVEN), False, "paused: outside hours 22:00–07:00"),
        (NIGHTS, state(now=DAY, idle=0), False, "outside hours"),
        (OFFICE, state(now=DAY), True, "within hours 09:00–17:00"),
        (OFFICE, state(now=NIGHT), False, "paused: outside hours 09:00–17:00"),
        (ProvidePolicy(when="hours", hours=(0, 24)), state(now=NIGHT), True, "within"),
        (HOT, state(temp=86), False, "paused: GPU at 86 °C, cap 83 °C"),
        (HOT, state(temp=83), True, "always on"),
        (HOT, state(), True, "always on"),  # no GPU reading: nothing to cap
        (ProvidePolicy(when="idle", gpu_temp_max=83), state(idle=900, temp=90), False, "90 °C"),
    ],
)
def test_decide(policy: ProvidePolicy, readings: MachineState, ok: bool, reason: str) -> None:
    answer = decide(policy, readings)
    assert answer.ok is ok
    assert reason in answer.reason
    assert answer.reason.startswith("rendering: " if ok else "paused: ")
    assert (answer.cause == "") is ok


def test_a_hot_gpu_stays_paused_until_it_is_5_degrees_below_the_cap() -> None:
    previous: Availability | None = None
    seen = []
    for temperature in (80, 84, 82, 78.5, 78, 77.9, 80, 83):
        previous = decide(HOT, state(temp=temperature), previous)
        seen.append((temperature, previous.ok, previous.cause))
    assert seen == [
        (80, True, ""),
        (84, False, "hot"),
        (82, False, "cooling"),  # below the cap, but not cool enough yet
        (78.5, False, "cooling"),
        (78, False, "cooling"),
        (77.9, True, ""),  # 5 °C below the cap: back to work
        (80, True, ""),  # no hysteresis on the way up
        (83, True, ""),
    ]
    cooling = decide(HOT, state(temp=80), decide(HOT, state(temp=90)))
    assert cooling.reason == "paused: GPU cooling down (80 °C, resumes below 78 °C)"


def test_the_user_returning_pauses_an_idle_node_at_once() -> None:
    readings = [state(idle=600), state(idle=601), state(idle=0.4), state(idle=400)]
    answers = [decide(IDLE, reading).ok for reading in readings]
    assert answers == [True, True, False, True]


@pytest.mark.parametrize(
    ("text", "hours"),
    [("22-7", (22, 7)), ("9-17", (9, 17)), ("0-24", (0, 24)), (" 22:00 - 07:00 ", (22, 7))],
)
def test_parse_hours(text: str, hours: tuple[int, int]) -> None:
    assert parse_hours(text) == hours


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("22", "is not START-END"),
        ("evening", "is not START-END"),
        ("22-7-3", "is not START-END"),
        ("22:30-7", "is not START-END"),
        ("25-3", "START is 0 to 23, END 0 to 24"),
        ("3-25", "START is 0 to 23"),
        ("7-7", "they differ"),
        ("", "is not START-END"),
    ],
)
def test_bad_hours_say_what_is_accepted(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as refused:
        parse_hours(text)
    assert "--hours" in refused.value.message


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"when": "sometimes"}, "--when must be one of always, idle, hours, not 'sometimes'"),
        ({"when": "hours"}, "--when hours needs --hours START-END"),
        ({"when": "hours", "hours": (5, 5)}, "--hours 5-5 is not a range of hours"),
        ({"idle_after": -1.0}, "--idle-after must be 0 seconds or more"),
        ({"idle_after": float("nan")}, "--idle-after"),
        ({"gpu_busy_above": 101.0}, "--gpu-busy-above must be 0 to 100 %"),
        ({"gpu_temp_max": 10.0}, "--gpu-temp-max must be 30 to 120 °C"),
        ({"gpu_temp_max": float("inf")}, "--gpu-temp-max"),
    ],
)
def test_a_bad_policy_names_its_option(fields: dict[str, object], message: str) -> None:
    policy = ProvidePolicy(**fields)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="Invalid providing policy") as refused:
        policy.validate()
    assert message in refused.value.message


def test_policies_describe_themselves() -> None:
    ProvidePolicy().validate()
    NIGHTS.validate()
    assert ProvidePolicy().describe() == "always"
    assert NIGHTS.describe() == "only 22:00–07:00 local time"
    assert "only while idle (no input for 300 s, GPU below 30 %)" in IDLE.describe()
    assert HOT.describe() == "always, paused above 83 °C"


# --- the machine state file ----------------------------------------------------------


def test_the_state_file_replaces_the_probes(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"input_idle_seconds": 12.5, "gpu_temperature": 71}))
    readings = read_state_file(path, DAY)
    assert readings == MachineState(12.5, None, 71.0, DAY)
    assert probe_machine(IDLE, path, node_on_gpu=True, now=DAY).node_on_gpu


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"input_idle_seconds": "long"}', '{"gpu_temperature": true}'],
)
def test_an_unreadable_state_file_pauses_and_says_why(tmp_path: Path, content: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    answer = decide(IDLE, read_state_file(path, DAY))
    assert not answer.ok and answer.cause == "state"
    assert f"cannot read the machine state file {path}" in answer.reason


def test_a_missing_state_file_pauses(tmp_path: Path) -> None:
    answer = AvailabilityTracker(ProvidePolicy(), tmp_path / "nowhere.json").check()
    assert not answer.ok and "nowhere.json" in answer.reason


def test_the_tracker_keeps_the_hysteresis_between_checks(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    tracker = AvailabilityTracker(HOT, path)
    for temperature, ok in ((90, False), (80, False), (70, True)):
        path.write_text(json.dumps({"gpu_temperature": temperature}))
        assert tracker.check().ok is ok
    assert tracker.last is not None and tracker.last.ok


def test_an_always_policy_without_a_cap_probes_nothing() -> None:
    def probe(on_gpu: bool) -> MachineState:
        raise AssertionError("probed")

    tracker = AvailabilityTracker(ProvidePolicy(), probe=probe)
    assert not tracker.active
    assert tracker.check(rendering=True).ok


def test_the_tracker_tells_the_probe_when_the_node_renders_on_the_gpu() -> None:
    calls: list[bool] = []

    def probe(on_gpu: bool) -> MachineState:
        calls.append(on_gpu)
        return state(idle=900, gpu=100, on_gpu=on_gpu)

    tracker = AvailabilityTracker(IDLE, renders_on_gpu=True, probe=probe)
    assert not tracker.check().ok  # idle node, GPU busy: someone else's work
    assert tracker.check(rendering=True).ok  # its own render
    assert calls == [False, True]


# --- probes ------------------------------------------------------------------------------


def test_logind_idle_hints() -> None:
    now = 1_700_000_100_000_000
    assert parse_idle_hint("IdleHint=no\nIdleSinceHint=0\n", now) == 0.0
    assert parse_idle_hint("IdleHint=yes\nIdleSinceHint=1700000000000000\n", now) == 100.0
    assert parse_idle_hint("IdleHint=yes\nIdleSinceHint=0\n", now) is None
    assert parse_idle_hint("Type=tty\n", now) is None


def test_probes_degrade_to_unknown_instead_of_failing() -> None:
    # Without xprintidle or loginctl the input idle time is unknown, not an error.
    assert probe_input_idle({"PATH": "/nonexistent", "DISPLAY": ":0"}) is None
    # Whatever this machine has (here: no display, no NVIDIA GPU), the real probes give
    # numbers or None, never an exception or a problem.
    readings = probe_machine(IDLE, now=DAY)
    assert readings.problem is None
    for value in (readings.input_idle_seconds, readings.gpu_utilisation, readings.gpu_temperature):
        assert value is None or value >= 0


# --- the command line ------------------------------------------------------------------


def node_args(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["node", *options])


def test_node_options_build_the_policy_and_limits() -> None:
    args = node_args(
        "--when",
        "idle",
        "--idle-after",
        "120",
        "--gpu-busy-above",
        "20",
        "--gpu-temp-max",
        "83",
        "--machine-state",
        "state.json",
        "--memory-limit",
        "8G",
        "--min-free-disk",
        "5G",
        "--sandbox",
        "off",
        "--task-timeout",
        "none",
    )
    assert providing(args) == ProvidePolicy(
        when="idle", idle_after=120, gpu_busy_above=20, gpu_temp_max=83
    )
    assert render_limits(args) == RenderLimits(memory=8 << 30, min_free_disk=5 << 30, sandbox="off")
    assert args.machine_state == Path("state.json") and args.task_timeout is None
    assert providing(node_args("--hours", "22-7")) == ProvidePolicy(when="hours", hours=(22, 7))
    assert render_limits(node_args("--memory-limit", "none")).memory is None
    defaults = node_args()
    assert providing(defaults) == ProvidePolicy()
    assert render_limits(defaults) == RenderLimits()
    assert defaults.task_timeout == 3600


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--when", "weekends"], "argument --when: invalid choice: 'weekends'"),
        (["--hours", "22"], "argument --hours: --hours '22' is not START-END"),
        (["--hours", "22-22"], "they differ"),
        (["--idle-after", "soon"], "argument --idle-after: 'soon' is not a number"),
        (["--idle-after", "-5"], "argument --idle-after: -5 is negative"),
        (["--gpu-busy-above", "150"], "argument --gpu-busy-above: 150 is not between 0 and 100"),
        (["--gpu-temp-max", "hot"], "argument --gpu-temp-max: 'hot' is not a number"),
        (["--memory-limit", "8X"], "argument --memory-limit: '8X' has an unknown unit 'x'"),
        (["--memory-limit", "8 parsecs"], "has an unknown unit 'parsecs'"),
        (["--min-free-disk=-1G"], "argument --min-free-disk: '-1G' is not a size of 0"),
        (["--min-free-disk", "lots"], "argument --min-free-disk: 'lots' is not a size"),
        (["--sandbox", "docker"], "argument --sandbox: invalid choice: 'docker'"),
        (["--task-timeout", "0"], "argument --task-timeout: 0 is not above 0"),
        (["--task-timeout", "inf"], "argument --task-timeout: 'inf' is not a finite number"),
    ],
)
def test_bad_node_options_are_usage_errors(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        node_args(*options)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--when", "hours"], "--when hours needs --hours START-END"),
        (["--when", "idle", "--hours", "22-7"], "--hours goes with --when hours, not --when idle"),
        (["--gpu-temp-max", "200"], "--gpu-temp-max must be 30 to 120 °C, not 200.0"),
        (["--memory-limit", "16M"], "--memory-limit 16777216 bytes is below 64 MiB"),
    ],
)
def test_node_option_combinations_that_cannot_work_exit_2(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before the node looks for a coordinator or starts Blender.
    argv = ["node", "--coordinator", "http://127.0.0.1:9", "--token", "t", *options]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


def test_coordinator_request_limit_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        [
            "coordinator",
            "--rate-limit",
            "0",
            "--rate-burst",
            "10",
            "--max-concurrent",
            "0",
            "--max-waiting",
            "100",
            "--max-body-bytes",
            "64K",
            "--min-free-disk",
            "5G",
        ]
    )
    assert args.min_free_disk == 5 << 30
    assert (args.rate_limit, args.rate_burst, args.max_concurrent) == (0, 10, 0)
    assert (args.max_waiting, args.max_body_bytes) == (100, 64 << 10)
    defaults = build_parser().parse_args(["coordinator"])
    assert (defaults.rate_limit, defaults.rate_burst, defaults.max_body_bytes) == (50, 200, 1 << 20)
    for options, message in (
        (["--rate-limit", "-1"], "argument --rate-limit: -1 is negative"),
        (["--rate-burst", "0"], "argument --rate-burst: 0 is not positive"),
        (["--max-concurrent", "many"], "argument --max-concurrent: 'many' is not a whole number"),
        (["--max-body-bytes", "1Q"], "argument --max-body-bytes: '1Q' has an unknown unit"),
    ):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["coordinator", *options])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1024", 1024),
        ("512M", 512 << 20),
        ("8G", 8 << 30),
        ("1.5GiB", 3 << 29),
        ("2 tb", 2 << 40),
        ("64k", 64 << 10),
    ],
)
def test_byte_sizes(text: str, size: int) -> None:
    assert byte_size(text) == size


# --- what the node counts as a full disk ---------------------------------------------------


def test_full_disk_errors_are_recognised_through_their_causes() -> None:
    from common.errors import BundleError, RenderFailedError
    from farm_node.gate import disk_full as _disk_full
    from renderers.worker import InsufficientDiskSpaceError

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/node/results/x.json")
    assert _disk_full(full) == (
        "the disk is full writing /node/results/x.json (No space left on device)"
    )
    wrapped = BundleError("Extracting bundle abc failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert _disk_full(wrapped) == "the disk is full (Disk quota exceeded)"
    refused = InsufficientDiskSpaceError("Only 1 MiB free in /x; a render needs at least 1 GiB")
    assert _disk_full(refused) == refused.message
    blender = RenderFailedError("Blender failed: cannot write /s/o.exr: No space left on device")
    assert _disk_full(blender) is not None
    assert _disk_full(RenderFailedError("no camera")) is None
    assert _disk_full(OSError(errno.EACCES, "Permission denied")) is None
