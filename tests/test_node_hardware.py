"""The node's hardware probe: pure /proc parsers on captured output, the Cycles CPU kernel,
and the capabilities a node registers with (degrading, never crashing)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from farm_node.hardware import (
    cpu_kernel,
    parse_cpu_flags,
    parse_cpuinfo,
    parse_meminfo,
    probe_capabilities,
    read_proc_file,
)
from renderers.builds import BlenderBuild
from renderers.devices import ComputeDevice, NvidiaGpu, parse_cycles_devices

FIXTURES = Path(__file__).parent / "fixtures" / "node"
DEVICE_FIXTURES = Path(__file__).parent / "fixtures" / "devices"
BUILD = BlenderBuild(kind="bpy", path=Path("/usr/bin/python3"), version="5.0.1", build_hash="x")


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.mark.parametrize(
    ("name", "model", "threads"),
    [
        ("cpuinfo_epyc_2threads.txt", "AMD EPYC", 2),
        ("cpuinfo_xeon_h100_16threads.txt", "Intel(R) Xeon(R) Processor", 16),
        ("cpuinfo_dual_xeon_silver_4110.txt", "Intel(R) Xeon(R) Silver 4110 CPU @ 2.10GHz", 32),
        ("cpuinfo_aarch64_graviton2.txt", "ARM Neoverse-N1", 2),
    ],
)
def test_parse_cpuinfo(name: str, model: str, threads: int) -> None:
    assert parse_cpuinfo(_fixture(name)) == (model, threads)


@pytest.mark.parametrize("text", ["", "garbage\nwithout: entries\n", "\n\n"])
def test_parse_cpuinfo_of_nothing_is_one_unknown_thread(text: str) -> None:
    assert parse_cpuinfo(text) == ("unknown CPU", 1)


@pytest.mark.parametrize(
    ("name", "mib"),
    [
        ("meminfo_24g.txt", 24683656 // 1024),
        ("meminfo_h100_128g.txt", 131981020 // 1024),
        ("meminfo_dual_xeon_192g.txt", 196681872 // 1024),
    ],
)
def test_parse_meminfo(name: str, mib: int) -> None:
    assert parse_meminfo(_fixture(name)) == mib


def test_parse_meminfo_without_memtotal_is_zero() -> None:
    assert parse_meminfo("MemFree: 100 kB\n") == 0


@pytest.mark.parametrize(
    ("name", "flag", "present"),
    [
        ("cpuinfo_epyc_2threads.txt", "avx2", True),
        ("cpuinfo_epyc_2threads.txt", "avx512f", False),
        ("cpuinfo_xeon_h100_16threads.txt", "avx512f", True),
        ("cpuinfo_aarch64_graviton2.txt", "asimd", True),
    ],
)
def test_parse_cpu_flags(name: str, flag: str, present: bool) -> None:
    assert (flag in parse_cpu_flags(_fixture(name))) is present


@pytest.mark.parametrize(
    ("name", "env", "kernel"),
    [
        ("cpuinfo_epyc_2threads.txt", {}, "AVX2"),
        ("cpuinfo_dual_xeon_silver_4110.txt", {}, "AVX2"),
        ("cpuinfo_epyc_2threads.txt", {"CYCLES_CPU_NO_AVX2": "1"}, "SSE4.2"),
        # Cycles tests only that the variable exists, so "0" disables AVX2 too.
        ("cpuinfo_epyc_2threads.txt", {"CYCLES_CPU_NO_AVX2": "0"}, "SSE4.2"),
        ("cpuinfo_aarch64_graviton2.txt", {}, "NEON"),
    ],
)
def test_cpu_kernel(name: str, env: dict[str, str], kernel: str) -> None:
    assert cpu_kernel(_fixture(name), env) == kernel


def test_cpu_kernel_without_avx2_is_sse42() -> None:
    text = _fixture("cpuinfo_epyc_2threads.txt").replace(" avx2 ", " ")
    assert cpu_kernel(text, {}) == "SSE4.2"
    assert cpu_kernel("", {}) == "generic"


def test_cpu_kernel_reads_this_machine_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CYCLES_CPU_NO_AVX2", raising=False)
    here = cpu_kernel()
    assert here in ("AVX2", "SSE4.2", "NEON", "generic")
    monkeypatch.setenv("CYCLES_CPU_NO_AVX2", "1")
    assert cpu_kernel() in ("SSE4.2", "NEON", "generic")


def test_an_unreadable_proc_file_degrades_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert read_proc_file(tmp_path / "missing") == ""
    assert "Could not read" in caplog.text


def test_capabilities_of_a_cpu_node() -> None:
    caps = probe_capabilities(
        "render-01",
        BUILD,
        [],
        [],
        cpuinfo=_fixture("cpuinfo_dual_xeon_silver_4110.txt"),
        meminfo=_fixture("meminfo_dual_xeon_192g.txt"),
        env={},
        hostname="rack3",
        benchmark_score=1.5,
    )
    assert caps.name == "render-01"
    assert caps.hostname == "rack3"
    assert caps.cpu == "Intel(R) Xeon(R) Silver 4110 CPU @ 2.10GHz"
    assert caps.cpu_threads == 32
    assert caps.ram_mib == 196681872 // 1024
    assert caps.devices == ["CPU"]
    assert caps.gpus == []
    assert caps.blender_versions == ["5.0.1"]
    assert caps.cpu_kernel == "AVX2"
    assert caps.benchmark_score == 1.5


def test_capabilities_report_configured_threads_and_the_kernel_of_the_render_env() -> None:
    caps = probe_capabilities(
        "n",
        BUILD,
        None,
        [],
        cpuinfo=_fixture("cpuinfo_epyc_2threads.txt"),
        meminfo=_fixture("meminfo_24g.txt"),
        env={"CYCLES_CPU_NO_AVX2": "1"},
        threads=1,
    )
    assert caps.cpu_threads == 1
    assert caps.cpu_kernel == "SSE4.2"
    assert caps.devices == ["CPU"]


def _h100_devices() -> list[ComputeDevice]:
    pci = "0000:01:00"
    return parse_cycles_devices(
        [
            {"type": "CPU", "name": "Intel Xeon", "id": "CPU"},
            {"type": "CUDA", "name": "NVIDIA H100 80GB HBM3", "id": f"CUDA_H100_{pci}"},
            {"type": "OPTIX", "name": "NVIDIA H100 80GB HBM3", "id": f"CUDA_H100_{pci}_OptiX"},
        ]
    )


def _h100_nvml() -> NvidiaGpu:
    return NvidiaGpu(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        uuid="GPU-1",
        memory_total_mib=81559,
        memory_used_mib=0,
        utilization_percent=0,
        temperature_c=30,
        power_w=70.0,
        driver_version="570.0",
        cuda_driver_version="12.8",
        compute_capability="9.0",
        pci_location=(0, 1, 0),
    )


def test_capabilities_of_a_gpu_node_carry_vram_from_nvml() -> None:
    caps = probe_capabilities(
        "gpu-01",
        BUILD,
        _h100_devices(),
        [_h100_nvml()],
        cpuinfo=_fixture("cpuinfo_xeon_h100_16threads.txt"),
        meminfo=_fixture("meminfo_h100_128g.txt"),
        env={},
    )
    assert caps.devices == ["CPU", "CUDA", "OPTIX"]
    assert [(g.type, g.name, g.vram_mib) for g in caps.gpus] == [
        ("CUDA", "NVIDIA H100 80GB HBM3", 81559),
        ("OPTIX", "NVIDIA H100 80GB HBM3", 81559),
    ]
    assert caps.ram_mib == 131981020 // 1024
    assert caps.cpu_threads == 16


def test_a_gpu_nvml_does_not_know_has_no_vram() -> None:
    caps = probe_capabilities("g", BUILD, _h100_devices(), [], cpuinfo="", meminfo="", env={})
    assert {g.vram_mib for g in caps.gpus} == {None}


def test_capabilities_from_broken_proc_files_degrade(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        caps = probe_capabilities("n", BUILD, None, [], cpuinfo="", meminfo="", env={})
    assert (caps.cpu, caps.cpu_threads, caps.ram_mib) == ("unknown CPU", 1, 0)
    assert "No CPU model" in caplog.text
    assert "MemTotal" in caplog.text


def test_capabilities_of_this_machine_round_trip_as_json() -> None:
    caps = probe_capabilities("here", BUILD, None, [])
    assert caps.cpu_threads >= 1
    assert caps.ram_mib > 0
    assert json.loads(caps.model_dump_json())["name"] == "here"
