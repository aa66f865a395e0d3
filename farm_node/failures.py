"""How a task that went wrong is told to the coordinator: one `FailureKind`, a bounded
message that names nothing of the provider's machine, and whether to retry elsewhere.

`failure_kind` is the one mapping from the node's exceptions to the wire's kinds (never
a Python class name on the wire). `failure_report` builds the `TaskFailure`: the
message has the node's own folders replaced by placeholders (``<bundle>/scene.blend``,
not ``/home/alice/.local/share/tessera/bundles/3f2a.../scene.blend``) and is cut to
`MAX_MESSAGE` characters. Pure: no I/O, no logging.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from common.errors import (
    BlenderNotFoundError,
    BundleError,
    CorruptSceneError,
    DeviceUnavailableError,
    ExrError,
    ExternalPathError,
    NoCameraError,
    RenderFailedError,
    RenderTimeoutError,
    SceneNotFoundError,
    TesseraError,
    UnsupportedEngineError,
    WorkerCrashedError,
)
from farm_node.errors import LeaseError, UnsafeBundleError
from protocol.models import FailureKind, TaskFailure
from renderers.worker import RenderMemoryLimitError

__all__ = ["MAX_MESSAGE", "NOT_RETRYABLE", "failure_kind", "failure_report", "scrub_paths"]

#: The longest failure message a node sends (`TaskFailure.message`'s limit).
MAX_MESSAGE = 4000

#: Exception classes and their kinds, most specific first (the first match wins).
_KINDS: tuple[tuple[type[BaseException], FailureKind], ...] = (
    (NoCameraError, FailureKind.NO_CAMERA),
    (CorruptSceneError, FailureKind.CORRUPT_SCENE),
    (UnsupportedEngineError, FailureKind.UNSUPPORTED_ENGINE),
    (SceneNotFoundError, FailureKind.SCENE_NOT_FOUND),
    (ExternalPathError, FailureKind.UNSAFE_BUNDLE),
    (UnsafeBundleError, FailureKind.UNSAFE_BUNDLE),
    (BundleError, FailureKind.BUNDLE),
    (RenderMemoryLimitError, FailureKind.OUT_OF_MEMORY),
    (RenderTimeoutError, FailureKind.RENDER_TIMEOUT),
    (WorkerCrashedError, FailureKind.WORKER_CRASHED),
    (RenderFailedError, FailureKind.RENDER_FAILED),
    (DeviceUnavailableError, FailureKind.DEVICE_UNAVAILABLE),
    (BlenderNotFoundError, FailureKind.BLENDER_NOT_FOUND),
    (ExrError, FailureKind.EXR),
    (LeaseError, FailureKind.LEASE),
)

#: Kinds every node would meet again (the scene's or the bundle's own faults, a lease
#: that cannot be acted on): the task fails instead of being retried elsewhere.
NOT_RETRYABLE = frozenset(
    {
        FailureKind.NO_CAMERA,
        FailureKind.CORRUPT_SCENE,
        FailureKind.UNSUPPORTED_ENGINE,
        FailureKind.SCENE_NOT_FOUND,
        FailureKind.UNSAFE_BUNDLE,
        FailureKind.LEASE,
    }
)


def failure_kind(error: BaseException) -> FailureKind:
    """The wire kind of `error`: `FailureKind.OTHER` for anything not named above."""
    for cls, kind in _KINDS:
        if isinstance(error, cls):
            return kind
    return FailureKind.OTHER


def scrub_paths(text: str, places: Iterable[tuple[Path, str]]) -> str:
    """`text` with every folder of `places` (and its resolved form) replaced by its label.

    Longer folders are replaced first, so ``data/bundles/<sha>`` wins over ``data``.
    """
    pairs: dict[str, str] = {}
    for folder, label in places:
        for form in (str(folder), str(folder.resolve())):
            if len(form) > 1:  # never "/" alone: that would mangle every path
                pairs.setdefault(form.rstrip("/"), label)
    for form in sorted(pairs, key=len, reverse=True):
        text = text.replace(form, pairs[form])
    return text


def failure_report(error: BaseException, places: Iterable[tuple[Path, str]] = ()) -> TaskFailure:
    """The `TaskFailure` a node sends for `error`: kind, scrubbed bounded message, retry."""
    kind = failure_kind(error)
    if isinstance(error, TesseraError):
        text = str(error).strip() or type(error).__name__
    else:  # a node bug or a library's error: the class name helps whoever reads it
        detail = str(error).strip()
        text = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    text = scrub_paths(text, places)
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return TaskFailure(kind=kind, message=text, retryable=kind not in NOT_RETRYABLE)
