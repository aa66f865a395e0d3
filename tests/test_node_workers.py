"""One worker per GPU, planned from recorded Cycles device lists (no GPU needed).

`plan_workers` is pure: it is run on the H100 capture and on a synthetic two-GPU list
(tests/fixtures/devices/README.md), and each plan's card ids go through the same
`use_flags` the Blender worker applies, so the flags each worker turns on are checked.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from common.errors import DeviceUnavailableError, UsageError
from farm_node.config import NodeConfig
from farm_node.fleet import worker_config
from farm_node.main import make_runner
from farm_node.workers import (
    CUDA_CACHE_MAXSIZE,
    WorkerPlan,
    gpu_cache_env,
    parse_gpu_selection,
    plan_workers,
    worker_name,
)
from renderers.builds import BlenderBuild
from renderers.devices import parse_cycles_devices
from renderers.sandbox import sandbox_command
from renderers.worker import RenderRequest
from renderers.worker_devices import use_flags
from tests.test_cli import tessera

FIXTURES = Path(__file__).parent / "fixtures" / "devices"
H100_CUDA = "CUDA_NVIDIA H100 80GB HBM3_0000:00:06"
RTX0 = "CUDA_NVIDIA GeForce RTX 4090_0000:01:00"
RTX1 = "CUDA_NVIDIA GeForce RTX 4090_0000:02:00"


def _raw(name: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = json.loads((FIXTURES / name).read_text())
    return rows


def _flags_on(raw: list[dict[str, str]], plan: WorkerPlan) -> list[str]:
    """The ids a worker of `plan` turns on, given Cycles' raw list (as worker_main does)."""
    pairs = [(row["type"], row["id"]) for row in raw]
    flags = use_flags(pairs, plan.device, plan.device_ids)
    return [dev_id for (_, dev_id), use in zip(pairs, flags, strict=True) if use]


def test_the_h100_capture_plans_one_optix_worker_on_its_card() -> None:
    raw = _raw("cycles_devices_h100.json")
    (plan,) = plan_workers(parse_cycles_devices(raw), device="GPU")
    assert plan.label == "gpu0"
    assert plan.device == "OPTIX"
    assert plan.device_ids == (H100_CUDA, f"{H100_CUDA}_OptiX")
    assert plan.card == "NVIDIA H100 80GB HBM3"
    assert _flags_on(raw, plan) == [f"{H100_CUDA}_OptiX"]


def test_the_h100_capture_with_cuda_asked_turns_on_the_cuda_device() -> None:
    raw = _raw("cycles_devices_h100.json")
    (plan,) = plan_workers(parse_cycles_devices(raw), device="CUDA", gpus="all")
    assert plan.device == "CUDA"
    assert _flags_on(raw, plan) == [H100_CUDA]


def test_two_gpus_plan_two_workers_each_on_its_own_card() -> None:
    raw = _raw("cycles_devices_2gpu.json")
    plans = plan_workers(parse_cycles_devices(raw), device="GPU")
    assert [plan.label for plan in plans] == ["gpu0", "gpu1"]
    assert [plan.device for plan in plans] == ["OPTIX", "OPTIX"]
    assert _flags_on(raw, plans[0]) == [f"{RTX0}_OptiX"]
    assert _flags_on(raw, plans[1]) == [f"{RTX1}_OptiX"]
    cuda = plan_workers(parse_cycles_devices(raw), device="CUDA")
    assert [_flags_on(raw, plan) for plan in cuda] == [[RTX0], [RTX1]]


def test_gpus_selects_cards_and_cpu_worker_adds_a_cpu_worker() -> None:
    devices = parse_cycles_devices(_raw("cycles_devices_2gpu.json"))
    (only,) = plan_workers(devices, device="GPU", gpus=(1,))
    assert (only.label, only.device_ids) == ("gpu1", (RTX1, f"{RTX1}_OptiX"))
    plans = plan_workers(devices, device="CPU", gpus="all", cpu_worker=True)
    assert [(p.label, p.device) for p in plans] == [
        ("gpu0", "OPTIX"),
        ("gpu1", "OPTIX"),
        ("cpu", "CPU"),
    ]
    assert plans[-1].device_ids == ()
    assert plan_workers(devices, device="GPU", gpus="none") == [WorkerPlan("cpu", "CPU")]
    assert plan_workers(devices) == [WorkerPlan("cpu", "CPU")], "a CPU node stays one worker"


def test_a_gpu_index_that_does_not_exist_is_refused_naming_the_cards() -> None:
    devices = parse_cycles_devices(_raw("cycles_devices_h100.json"))
    with pytest.raises(UsageError, match=r"GPU 2.*1 OPTIX GPU here \(0: NVIDIA H100"):
        plan_workers(devices, device="GPU", gpus=(0, 2))


def test_a_gpu_asked_for_on_a_cpu_only_machine_is_refused() -> None:
    devices = parse_cycles_devices(_raw("cycles_devices_cpu_only.json"))
    with pytest.raises(DeviceUnavailableError, match="No GPU device"):
        plan_workers(devices, device="GPU")
    with pytest.raises(DeviceUnavailableError, match="No GPU device"):
        plan_workers(devices, gpus="all", cpu_worker=True)
    h100 = parse_cycles_devices(_raw("cycles_devices_h100.json"))
    with pytest.raises(DeviceUnavailableError, match="No HIP device"):
        plan_workers(h100, device="HIP")


@pytest.mark.parametrize(
    ("text", "expected"), [("all", "all"), (" None ", "none"), ("0,2", (0, 2)), ("1,1", (1,))]
)
def test_parse_gpu_selection(text: str, expected: object) -> None:
    assert parse_gpu_selection(text) == expected


@pytest.mark.parametrize("text", ["", "first", "0,,1", "-1", "0;1"])
def test_parse_gpu_selection_refuses_what_is_not_an_index(text: str) -> None:
    with pytest.raises(UsageError, match="is not a GPU index"):
        parse_gpu_selection(text)


def test_use_flags_refuse_ids_cycles_does_not_list() -> None:
    pairs = [(row["type"], row["id"]) for row in _raw("cycles_devices_h100.json")]
    with pytest.raises(ValueError, match="None of the OPTIX devices CUDA_X is on this machine"):
        use_flags(pairs, "OPTIX", ("CUDA_X",))
    assert use_flags(pairs, "CUDA") == [True, False, False, False, False], "no ids: the type"


def test_each_worker_gets_its_name_folder_card_and_the_shared_kernel_caches(
    tmp_path: Path,
) -> None:
    config = NodeConfig(coordinator_url="http://127.0.0.1:1", data_dir=tmp_path, name="box")
    devices = parse_cycles_devices(_raw("cycles_devices_2gpu.json"))
    plans = plan_workers(devices, device="GPU", cpu_worker=True)
    workers = [worker_config(config, plan, len(plans)) for plan in plans]
    assert [w.name for w in workers] == ["box/gpu0", "box/gpu1", "box/cpu"]
    assert [w.data_dir for w in workers] == [tmp_path / "workers" / p.label for p in plans]
    assert [w.device for w in workers] == ["OPTIX", "OPTIX", "CPU"]
    assert workers[1].device_ids == (RTX1, f"{RTX1}_OptiX")
    assert workers[0].warms_up and workers[1].warms_up and not workers[2].warms_up
    gpu_env = workers[0].extra_env
    assert gpu_env["CUDA_CACHE_PATH"] == str(tmp_path / "gpu-cache" / "cuda")
    assert gpu_env["OPTIX_CACHE_PATH"] == str(tmp_path / "gpu-cache" / "optix")
    assert int(gpu_env["CUDA_CACHE_MAXSIZE"]) == CUDA_CACHE_MAXSIZE == 4 << 30
    assert workers[0].limits.shared_dirs == (
        tmp_path / "gpu-cache" / "cuda",
        tmp_path / "gpu-cache" / "optix",
    )
    assert "CUDA_CACHE_PATH" not in workers[2].extra_env, "the CPU worker needs no GPU cache"
    (single,) = [worker_config(config, plan, 1) for plan in plans[:1]]
    assert (single.name, single.data_dir) == ("box", tmp_path), "one worker keeps the node's"
    assert worker_name("box", plans[0], 1) == "box"


def test_a_node_variable_wins_over_the_cache_defaults(tmp_path: Path) -> None:
    config = NodeConfig(
        coordinator_url="http://127.0.0.1:1",
        data_dir=tmp_path,
        extra_env={"CUDA_CACHE_PATH": "/fast/cache"},
    )
    worker = worker_config(config, WorkerPlan("gpu0", "CUDA", ("CUDA_A",), "A"), 2)
    assert worker.extra_env["CUDA_CACHE_PATH"] == "/fast/cache"
    assert gpu_cache_env(tmp_path)["CUDA_CACHE_DISABLE"] == "0"


def test_the_sandbox_lets_blender_write_the_kernel_caches(tmp_path: Path) -> None:
    cache = tmp_path / "gpu-cache" / "cuda"
    cache.mkdir(parents=True)
    argv = sandbox_command("bwrap", tmp_path / "scratch", ["blender"], shared=[cache])
    index = argv.index(str(cache))
    assert argv[index - 1] == "--bind" and argv[index + 1] == str(cache)


def test_a_render_request_carries_its_card_ids() -> None:
    request = RenderRequest(
        scene=Path("s.blend"), frame=1, output=Path("o.exr"), device="OPTIX", device_ids=("A",)
    )
    assert request.to_message()["device_ids"] == ["A"]


def test_the_warm_up_timeout_must_be_positive(tmp_path: Path) -> None:
    config = NodeConfig(coordinator_url="http://127.0.0.1:1", data_dir=tmp_path, warmup_timeout=0)
    with pytest.raises(UsageError, match="--warmup-timeout must be positive"):
        config.validate()


def _node(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return tessera(
        "node",
        "--coordinator",
        "http://127.0.0.1:9",
        "--token",
        "t",
        "--no-benchmark",
        "--data",
        tmp_path / "node",
        *options,
        timeout=120,
    )


def test_tessera_node_refuses_a_bad_gpu_list(tmp_path: Path) -> None:
    done = _node(tmp_path, "--gpus", "first")
    assert done.returncode == 2
    assert "--gpus 'first': 'first' is not a GPU index" in done.stderr
    done = _node(tmp_path, "--warmup-timeout", "0")
    assert done.returncode == 2
    assert "--warmup-timeout" in done.stderr


def test_tessera_node_asked_for_gpus_on_a_cpu_machine_refuses_to_start(tmp_path: Path) -> None:
    """No quiet CPU render: a node told to use GPUs where Cycles lists none stops."""
    done = _node(tmp_path, "--gpus", "all", "--sandbox", "off")
    assert done.returncode == 1
    assert "No GPU device on this machine (Cycles sees: CPU)" in done.stderr


def test_each_worker_runner_is_bound_to_its_card(bpy_build: BlenderBuild, tmp_path: Path) -> None:
    config = NodeConfig(coordinator_url="http://127.0.0.1:1", data_dir=tmp_path, name="box")
    plans = plan_workers(parse_cycles_devices(_raw("cycles_devices_2gpu.json")), device="GPU")
    runners = [make_runner(worker_config(config, plan, 2), bpy_build) for plan in plans]
    try:
        assert [r.device for r in runners] == ["OPTIX", "OPTIX"]
        assert [r.device_ids for r in runners] == [
            (RTX0, f"{RTX0}_OptiX"),
            (RTX1, f"{RTX1}_OptiX"),
        ]
        assert runners[1]._ids_for("CUDA") == (RTX1, f"{RTX1}_OptiX")
        assert runners[1]._ids_for("CPU") == (), "a CPU render names no card"
        assert runners[0].limits.shared_dirs == (
            tmp_path / "gpu-cache" / "cuda",
            tmp_path / "gpu-cache" / "optix",
        )
        assert runners[0].extra_env["CUDA_CACHE_PATH"] == str(tmp_path / "gpu-cache" / "cuda")
    finally:
        for runner in runners:
            runner.close()
