"""Tests of renderers.devices: pure parsers on captured device reports, and device choice.

Fixtures in tests/fixtures/devices/ are real captures (see the README there): the Cycles
device report of a CPU-only machine and of an H100 machine, and NVML read on the H100.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from common.errors import DeviceUnavailableError, UsageError
from renderers import devices
from renderers.devices import (
    DEVICE_TYPES,
    ComputeDevice,
    normalise_device_name,
    nvml_snapshot,
    parse_cycles_devices,
    parse_nvml_snapshot,
    probe_nvidia,
    resolve_device,
    summarise,
)

FIXTURES = Path(__file__).parent / "fixtures" / "devices"


def _load(name: str) -> object:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def _cycles(name: str) -> list[ComputeDevice]:
    raw = _load(name)
    assert isinstance(raw, list)
    return parse_cycles_devices(raw)


CPU_ONLY = "cycles_devices_cpu_only.json"
H100 = "cycles_devices_h100.json"
NVML_H100 = "nvml_h100.json"


# --- parse_cycles_devices ----------------------------------------------------------------


def test_parse_cpu_only_capture() -> None:
    assert _cycles(CPU_ONLY) == [ComputeDevice("CPU", "AMD EPYC", "CPU")]


def test_parse_h100_capture() -> None:
    parsed = _cycles(H100)
    raw = _load(H100)
    assert isinstance(raw, list)
    # Cycles repeats the CPU after the GPUs of every type: one CPU row remains.
    assert len(parsed) < len(raw)
    assert [d.type for d in parsed].count("CPU") == 1
    by_type = {d.type: d for d in parsed}
    assert set(by_type) == {"CPU", "CUDA", "OPTIX"}
    assert "H100" in by_type["CUDA"].name
    assert by_type["OPTIX"].name == by_type["CUDA"].name
    assert by_type["OPTIX"].id.endswith("_OptiX")
    assert all(d.is_gpu for d in parsed if d.type != "CPU")


def test_parse_drops_unknown_and_malformed_rows(caplog: pytest.LogCaptureFixture) -> None:
    raw: list[dict[str, object]] = [
        {"type": "CPU", "name": "AMD EPYC", "id": "CPU"},
        {"type": "VULKAN", "name": "Some GPU", "id": "VK_0"},
        {"type": "CUDA", "name": "NVIDIA RTX A4000", "id": "CUDA_A4000_0000:01:00"},
        {"type": "CUDA", "name": "NVIDIA RTX A4000", "id": "CUDA_A4000_0000:01:00"},
        {"type": "optix", "name": "NVIDIA RTX A4000", "id": "CUDA_A4000_0000:01:00_OptiX"},
        {"type": "CUDA", "name": None, "id": "x"},
        {"name": "no type", "id": "y"},
    ]
    with caplog.at_level(logging.WARNING, logger="renderers.devices"):
        parsed = parse_cycles_devices(raw)
    assert [(d.type, d.id) for d in parsed] == [
        ("CPU", "CPU"),
        ("CUDA", "CUDA_A4000_0000:01:00"),
        ("OPTIX", "CUDA_A4000_0000:01:00_OptiX"),
    ]
    assert "unknown type 'VULKAN'" in caplog.text
    assert "without type/name/id" in caplog.text


def test_parse_empty_report() -> None:
    assert parse_cycles_devices([]) == []


# --- normalise_device_name / resolve_device ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu", "CPU"),
        ("optix", "OPTIX"),
        ("OptiX", "OPTIX"),
        (" gpu ", "GPU"),
        ("oneapi", "ONEAPI"),
    ],
)
def test_normalise_device_name(text: str, expected: str) -> None:
    assert normalise_device_name(text) == expected


@pytest.mark.parametrize("text", ["", "vulkan", "GPU0", "cuda:0", "auto"])
def test_normalise_device_name_rejects(text: str) -> None:
    with pytest.raises(UsageError) as info:
        normalise_device_name(text)
    for name in (*DEVICE_TYPES, "GPU"):
        assert name in info.value.message


@pytest.mark.parametrize(
    ("fixture", "requested", "expected"),
    [
        (CPU_ONLY, "CPU", "CPU"),
        (H100, "CPU", "CPU"),
        (H100, "GPU", "OPTIX"),
        (H100, "optix", "OPTIX"),
        (H100, "CUDA", "CUDA"),
    ],
)
def test_resolve_present(fixture: str, requested: str, expected: str) -> None:
    assert resolve_device(requested, _cycles(fixture)) == expected


def test_resolve_gpu_prefers_cuda_without_optix() -> None:
    cuda_only = [d for d in _cycles(H100) if d.type != "OPTIX"]
    assert resolve_device("GPU", cuda_only) == "CUDA"


def test_resolve_cpu_always_works() -> None:
    assert resolve_device("cpu", []) == "CPU"


@pytest.mark.parametrize(
    ("fixture", "requested", "message"),
    [
        (CPU_ONLY, "OPTIX", "No OPTIX device on this machine (Cycles sees: CPU)"),
        (CPU_ONLY, "CUDA", "No CUDA device on this machine (Cycles sees: CPU)"),
        (CPU_ONLY, "GPU", "No GPU device on this machine (Cycles sees: CPU)"),
        (H100, "HIP", "No HIP device on this machine (Cycles sees: CPU, CUDA, OPTIX)"),
        (H100, "metal", "No METAL device on this machine (Cycles sees: CPU, CUDA, OPTIX)"),
    ],
)
def test_resolve_absent_names_what_is_there(fixture: str, requested: str, message: str) -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        resolve_device(requested, _cycles(fixture))
    assert info.value.message == message
    assert "tessera devices" in info.value.hint


def test_resolve_absent_with_no_devices_at_all() -> None:
    with pytest.raises(DeviceUnavailableError, match=r"Cycles sees: no devices"):
        resolve_device("GPU", [])


def test_resolve_rejects_unknown_name() -> None:
    with pytest.raises(UsageError):
        resolve_device("vulkan", _cycles(H100))


# --- NVML --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, {}])
def test_parse_nvml_nothing(raw: dict[str, object] | None) -> None:
    assert parse_nvml_snapshot(raw) == []


def test_parse_nvml_h100_capture() -> None:
    raw = _load(NVML_H100)
    assert isinstance(raw, dict)
    (gpu,) = parse_nvml_snapshot(raw)
    assert gpu.index == 0
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.uuid.startswith("GPU-")
    assert 80_000 < gpu.memory_total_mib < 82_000
    assert 0 <= gpu.memory_used_mib < gpu.memory_total_mib
    assert gpu.compute_capability == "9.0"
    assert gpu.driver_version.count(".") == 2
    assert gpu.cuda_driver_version is not None and gpu.cuda_driver_version.count(".") == 1
    assert gpu.pci_location is not None
    assert gpu.power_w is None or 0 < gpu.power_w < 1000


def test_parse_nvml_tolerates_missing_figures(caplog: pytest.LogCaptureFixture) -> None:
    raw: dict[str, object] = {
        "driver_version": "580.159.04",
        "cuda_driver_version": 12080,
        "gpus": [
            {
                "name": "NVIDIA A2",
                "uuid": "GPU-1",
                "memory_total_bytes": 16 * 2**30,
                "memory_used_bytes": 2**20,
                "utilization_gpu_percent": None,
                "temperature_c": None,
                "power_usage_mw": None,
                "compute_capability": None,
            },
            {"name": "broken entry"},
            "not a mapping",
        ],
    }
    with caplog.at_level(logging.WARNING, logger="renderers.devices"):
        (gpu,) = parse_nvml_snapshot(raw)
    assert (gpu.index, gpu.memory_total_mib, gpu.memory_used_mib) == (0, 16384, 1)
    assert gpu.cuda_driver_version == "12.8"
    assert gpu.utilization_percent is None and gpu.power_w is None
    assert gpu.compute_capability is None and gpu.pci_location is None
    assert "broken entry" in caplog.text


def test_parse_nvml_without_gpu_list() -> None:
    assert parse_nvml_snapshot({"driver_version": "580.159.04", "gpus": "oops"}) == []


def _has_nvidia_driver() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


def test_nvml_snapshot_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(devices, "_nvml_warned", False)
    with caplog.at_level(logging.WARNING, logger="renderers.devices"):
        first = nvml_snapshot()
        second = nvml_snapshot()
        gpus = probe_nvidia()
    if _has_nvidia_driver():
        pytest.skip("this machine has an NVIDIA driver; the no-GPU path is not reachable")
    assert first is None and second is None and gpus == []
    # "Log once": three failed reads, one warning.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "assuming no NVIDIA GPU" in warnings[0].getMessage()


# --- summarise ---------------------------------------------------------------------------


def test_summarise_merges_nvml_into_nvidia_rows() -> None:
    raw = _load(NVML_H100)
    assert isinstance(raw, dict)
    rows = summarise(_cycles(H100), parse_nvml_snapshot(raw))
    assert len({tuple(sorted(row)) for row in rows}) == 1  # every row has the same keys
    by_type = {row["type"]: row for row in rows}
    for gpu_type in ("CUDA", "OPTIX"):
        row = by_type[gpu_type]
        assert row["is_gpu"] is True
        assert isinstance(row["memory_total_mib"], int) and row["memory_total_mib"] > 80_000
        assert row["compute_capability"] == "9.0"
        assert row["driver_version"]
    assert by_type["CPU"]["is_gpu"] is False
    assert by_type["CPU"]["memory_total_mib"] is None
    json.dumps(rows)  # JSON-ready


def test_summarise_matches_by_pci_location_among_identical_cards() -> None:
    cycles = parse_cycles_devices(
        [
            {"type": "CUDA", "name": "NVIDIA L4", "id": "CUDA_NVIDIA L4_0000:82:00"},
            {"type": "CUDA", "name": "NVIDIA L4", "id": "CUDA_NVIDIA L4_0000:01:00"},
        ]
    )
    card = {"name": "NVIDIA L4", "memory_total_bytes": 23034 * 2**20, "memory_used_bytes": 0}
    gpus = parse_nvml_snapshot(
        {
            "driver_version": "580.159.04",
            "gpus": [
                {**card, "index": 0, "uuid": "GPU-a", "pci_bus_id": "00000000:01:00.0"},
                {**card, "index": 1, "uuid": "GPU-b", "pci_bus_id": "00000000:82:00.0"},
            ],
        }
    )
    rows = summarise(cycles, gpus)
    assert [row["uuid"] for row in rows] == ["GPU-b", "GPU-a"]


def test_summarise_without_nvml() -> None:
    rows = summarise(_cycles(CPU_ONLY), [])
    assert rows[0]["type"] == "CPU" and rows[0]["driver_version"] is None
