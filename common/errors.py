"""The one exception hierarchy of Tessera.

Every error a user can meet is a `TesseraError` subclass whose message names what is
wrong and whose `hint` says what to do about it. Code catches the specific subclass;
the CLI and the app catch `TesseraError` and show `str(error)`, never a traceback.
This module imports nothing but the standard library.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base of every error Tessera reports to a person."""

    #: A short, actionable suggestion shown under the message.
    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready description (kind, message, hint) for CLIs and wire replies."""
        return {"kind": type(self).__name__, "message": self.message, "hint": self.hint}


class UsageError(TesseraError):
    """A command-line value or option combination that cannot work."""


# --- Scenes --------------------------------------------------------------------------


class SceneError(TesseraError):
    """The scene cannot be rendered as it is; nothing was uploaded or rendered."""


class SceneNotFoundError(SceneError):
    default_hint = "Check the path; it must point to a saved .blend file."


class SceneUnreadableError(SceneError):
    default_hint = "Check the file's permissions (it must be readable by this user)."


class NotABlendFileError(SceneError):
    default_hint = "Pass a .blend file saved by Blender (File > Save)."


class CorruptSceneError(SceneError):
    default_hint = "Open the file in Blender and save it again, or use a backup (.blend1)."


class NoCameraError(SceneError):
    default_hint = (
        "Set an active camera in Blender (select a camera, Ctrl+Numpad0) and save the file."
    )


class UnsupportedEngineError(SceneError):
    default_hint = "Switch the render engine to Cycles (Render Properties > Render Engine)."


class ExternalPathError(SceneError):
    """The scene reads a file outside its own bundle (an absolute path, `//../..`, a
    library or image sequence elsewhere): a provider never shows a stranger's scene its
    own files, so such a scene is not rendered."""

    default_hint = (
        "Pack the file with its assets (tessera submit does) or make the path relative to a"
        " file inside the scene's folder, and submit again."
    )


# --- Blender and devices ---------------------------------------------------------------


class BlenderNotFoundError(TesseraError):
    default_hint = (
        "Install the bpy module (`pip install bpy==5.0.1` on Python 3.11) or put a Blender "
        "executable on PATH / pass its path with --blender."
    )


class DeviceUnavailableError(TesseraError):
    default_hint = "Run `tessera devices` to see what this machine offers, or use --device CPU."


# --- The render worker -------------------------------------------------------------------


class WorkerError(TesseraError):
    """The Blender worker process failed to do what it was asked."""


class WorkerStartError(WorkerError):
    default_hint = "Run `tessera devices` to check that Blender starts on this machine."


class WorkerCrashedError(WorkerError):
    default_hint = "The render was not finished; retrying starts a fresh Blender process."


class RenderTimeoutError(WorkerError):
    default_hint = "Raise the time limit, lower samples or resolution, or split into more tiles."


class RenderCancelledError(WorkerError):
    default_hint = ""


class RenderFailedError(WorkerError):
    """Blender ran but raised an error while rendering (out of memory, bad scene data...)."""


# --- Regions, images ------------------------------------------------------------------


class RegionError(TesseraError):
    """A tile grid or region that cannot cover the frame."""


class ExrError(TesseraError):
    """An EXR file that is missing, unreadable or does not match what was expected."""


class MergeError(ExrError):
    """Tiles that cannot be merged into one frame (missing, mismatched passes or sizes)."""


# --- the farm's HTTP API ---------------------------------------------------------------------


class ApiError(TesseraError):
    """The coordinator refused a request; `status` is the HTTP status code."""

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class CoordinatorUnreachableError(TesseraError):
    default_hint = (
        "Check the coordinator URL and that it is running (`tessera coordinator`), "
        "or use --lan to find one on this network."
    )


class BundleError(TesseraError):
    """A scene bundle that cannot be packed, uploaded, fetched or safely extracted."""
