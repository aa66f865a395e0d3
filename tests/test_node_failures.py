"""What a node tells the coordinator about a task that went wrong (`farm_node.failures`):
one wire kind per exception (never a class name), a bounded message naming none of the
provider's folders, and no retry for the scene's or the bundle's own faults. Also the
shape of the package: `import farm_node` imports no daemon."""

from __future__ import annotations

import errno
import lzma
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from common.errors import (
    BlenderNotFoundError,
    BundleError,
    CorruptSceneError,
    DeviceUnavailableError,
    ExrError,
    ExternalPathError,
    MergeError,
    NoCameraError,
    RenderCancelledError,
    RenderFailedError,
    RenderTimeoutError,
    SceneNotFoundError,
    UnsupportedEngineError,
    WorkerCrashedError,
)
from farm_node.cheats import CheatMode
from farm_node.config import CHEAT_MODES
from farm_node.errors import LeaseError, UnsafeBundleError
from farm_node.failures import MAX_MESSAGE, failure_kind, failure_report, scrub_paths
from protocol.models import FailureKind, TaskFailure
from renderers.worker import RenderMemoryLimitError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("error", "kind", "retryable"),
    [
        (NoCameraError("x"), FailureKind.NO_CAMERA, False),
        (CorruptSceneError("x"), FailureKind.CORRUPT_SCENE, False),
        (UnsupportedEngineError("x"), FailureKind.UNSUPPORTED_ENGINE, False),
        (SceneNotFoundError("x"), FailureKind.SCENE_NOT_FOUND, False),
        (ExternalPathError("x"), FailureKind.UNSAFE_BUNDLE, False),
        (UnsafeBundleError("x"), FailureKind.UNSAFE_BUNDLE, False),
        (BundleError("x"), FailureKind.BUNDLE, True),
        (RenderMemoryLimitError("x"), FailureKind.OUT_OF_MEMORY, True),
        (RenderTimeoutError("x"), FailureKind.RENDER_TIMEOUT, True),
        (WorkerCrashedError("x"), FailureKind.WORKER_CRASHED, True),
        (RenderFailedError("x"), FailureKind.RENDER_FAILED, True),
        (DeviceUnavailableError("x"), FailureKind.DEVICE_UNAVAILABLE, True),
        (BlenderNotFoundError("x"), FailureKind.BLENDER_NOT_FOUND, True),
        (ExrError("x"), FailureKind.EXR, True),
        (MergeError("x"), FailureKind.EXR, True),
        (LeaseError("x"), FailureKind.LEASE, False),
        (RenderCancelledError("x"), FailureKind.OTHER, True),
        (OSError(errno.EIO, "I/O error"), FailureKind.OTHER, True),
        (ValueError("x"), FailureKind.OTHER, True),
        (zlib.error("x"), FailureKind.OTHER, True),
        (lzma.LZMAError("x"), FailureKind.OTHER, True),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_every_error_has_one_wire_kind(
    error: BaseException, kind: FailureKind, retryable: bool
) -> None:
    assert failure_kind(error) is kind
    report = failure_report(error)
    assert (report.kind, report.retryable) == (kind, retryable)
    # What goes on the wire is the kind's value, which the coordinator's model accepts.
    assert TaskFailure.model_validate_json(report.model_dump_json()) == report
    assert report.model_dump(mode="json")["kind"] == kind.value != type(error).__name__


def test_scene_faults_are_never_retried() -> None:
    for kind in FailureKind:
        if kind.scene_fault:
            assert failure_report(_raising(kind)).retryable is False


def _raising(kind: FailureKind) -> BaseException:
    return {
        FailureKind.NO_CAMERA: NoCameraError("x"),
        FailureKind.CORRUPT_SCENE: CorruptSceneError("x"),
        FailureKind.UNSUPPORTED_ENGINE: UnsupportedEngineError("x"),
    }[kind]


def test_the_nodes_folders_are_replaced_longest_first(tmp_path: Path) -> None:
    data = tmp_path / "node"
    bundle = data / "bundles" / ("a" * 64)
    places = [(data, "<node>"), (bundle, "<bundle>"), (data / "scratch", "<scratch>")]
    text = (
        f"Cannot read file '{bundle}/scene.blend': truncated; "
        f"log in {data}/scratch/worker-1/blender.log; see {data}/benchmark.json"
    )
    assert scrub_paths(text, places) == (
        "Cannot read file '<bundle>/scene.blend': truncated; "
        "log in <scratch>/worker-1/blender.log; see <node>/benchmark.json"
    )


def test_a_symlinked_folder_is_replaced_in_its_resolved_form_too(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert scrub_paths(f"{real}/x and {link}/y", [(link, "<node>")]) == "<node>/x and <node>/y"


def test_the_root_folder_is_never_replaced() -> None:
    assert scrub_paths("/etc/passwd", [(Path("/"), "<node>")]) == "/etc/passwd"


def test_a_failure_message_is_bounded_and_keeps_its_start(tmp_path: Path) -> None:
    error = RenderFailedError(f"{tmp_path}/bundles/x: " + "y" * 20_000)
    report = failure_report(error, [(tmp_path, "<node>")])
    assert len(report.message) == MAX_MESSAGE
    assert report.message.startswith("<node>/bundles/x: yyy")
    assert str(tmp_path) not in report.message


def test_an_unknown_error_names_its_class_in_the_message_only() -> None:
    report = failure_report(KeyError("frame"))
    assert (report.kind, report.message) == (FailureKind.OTHER, "KeyError: 'frame'")
    assert failure_report(RuntimeError()).message == "RuntimeError"


def test_the_configs_cheat_modes_are_the_cheats() -> None:
    assert tuple(mode.value for mode in CheatMode) == CHEAT_MODES


def test_importing_the_package_imports_no_daemon() -> None:
    code = (
        "import sys, farm_node\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('farm_node.'))\n"
        "assert loaded == [], loaded\n"
        "assert farm_node.NodeConfig.__module__ == 'farm_node.config'\n"
        "assert 'farm_node.daemon' not in sys.modules\n"
        "assert farm_node.run_node.__module__ == 'farm_node.main'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
