"""Pack a scene and everything it uses into one deterministic zip bundle named by its SHA-256.

`pack_scene` traces the .blend with blender-asset-tracer (BAT 1.x): linked libraries
(recursively), images, image sequences and UDIM tiles, movie clips, sounds, fonts, caches
and volumes; plain, gzip and zstd-compressed .blend files. Paths in the packed .blend
files are rewritten to be relative, so the bundle renders wherever it is extracted.

Layout: every path in the bundle is relative to a *project folder*: by default the
deepest folder holding the scene and every dependency that exists. Dependencies outside
it (only when that folder would be the filesystem root) go where BAT puts them,
under `_outside_project/<their absolute path without the root>`. Missing files are
listed, never fatal: the scene still renders, with whatever Blender does for a missing
image (pink) or library (empty).

The zip is reproducible: entries sorted, fixed timestamps and permissions, and
gzip-compressed .blend files stored uncompressed (BAT re-gzips a compressed .blend it
rewrote, with the time and a random name in the gzip header; zstd ones come back gzip).
Packing the same scene twice gives the same hash, so the coordinator skips the upload.

This module never imports bpy or Qt and never touches the network. BAT keeps a
process-wide cache of open .blend files, so packs run one at a time (a module lock).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import pathlib
import shutil
import struct
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from blender_asset_tracer import blendfile, bpathlib, trace
from blender_asset_tracer.blendfile.exceptions import BlendFileError
from blender_asset_tracer.pack import Aborted, Packer, transfer
from blender_asset_tracer.pack import progress as pack_progress
from blender_asset_tracer.trace import file_sequence

from common.errors import BundleError, CorruptSceneError, ExternalPathError, TesseraError
from renderers.scene_info import check_scene_file
from renderers.scene_paths import check_scene_paths

log = logging.getLogger(__name__)

#: Where BAT puts dependencies that lie outside the project folder.
OUTSIDE_PROJECT = "_outside_project"
#: BAT writes this note beside the packed files; the bundle does not need it.
BAT_INFO_FILE = "pack-info.txt"
#: 1980-01-01 00:00:00, the earliest time a zip entry can carry.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
#: Already-compressed formats are stored, not deflated (faster, and no bigger).
STORE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".exr", ".mp4", ".mkv", ".mov", ".webm"})
GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1 << 20

_PACK_LOCK = threading.Lock()

PackStage = Literal["trace", "copy", "zip"]


@dataclass(frozen=True, slots=True)
class PackProgress:
    """One progress report: `done` of `total` files (trace, copy) or bytes (zip)."""

    stage: PackStage
    done: int
    total: int
    path: str = ""


@dataclass(frozen=True, slots=True)
class PackResult:
    """A bundle on disk and what went into it."""

    zip_path: Path
    sha256: str
    size: int
    #: The .blend to open, inside the zip, '/'-separated and relative.
    scene_path: str
    #: Every file in the zip, '/'-separated, sorted.
    files: tuple[str, ...]
    #: Dependencies the scene refers to that do not exist (absolute paths on this machine).
    missing: tuple[Path, ...]
    warnings: tuple[str, ...] = field(default=())
    #: The folder the bundle's paths are relative to.
    project: Path = Path()


ProgressCallback = Callable[[PackProgress], None]


def pack_scene(
    scene: Path,
    out_dir: Path,
    *,
    on_progress: ProgressCallback | None = None,
    project: Path | None = None,
) -> PackResult:
    """Pack `scene` and its dependencies into `out_dir/<sha256>.zip`.

    `project` forces the folder the bundle's paths are relative to (it must contain the
    scene); by default it is the deepest folder holding the scene and its dependencies.
    Raises a `SceneError` subclass for a scene that is missing, not a .blend or corrupt,
    and `BundleError` when a dependency cannot be read or the bundle cannot be written.
    """
    scene = check_scene_file(scene)
    out_dir = out_dir.resolve()
    if project is not None:
        project = project.resolve()
        if not scene.is_relative_to(project):
            raise BundleError(
                f"The project folder {project} does not contain the scene {scene}.",
                hint="Pass a folder above the .blend file, or leave the project folder out.",
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(
            f"Cannot create the bundle folder {out_dir}: {exc.strerror or exc}."
        ) from exc
    report = on_progress or _ignore_progress
    with _PACK_LOCK:
        try:
            with tempfile.TemporaryDirectory(prefix=".pack-", dir=out_dir) as scratch:
                return _pack(scene, out_dir, Path(scratch), project, report)
        finally:
            # BAT caches open .blend files (and their decompressed temporary copies).
            blendfile.close_all_cached()


def _provider_refusal(scene: Path, bundle: Path) -> str | None:
    """What a provider's node will say of the packed scene, if it refuses it: a path that
    still leads outside the bundle (a missing file named by an absolute path or by one
    that climbs out of the project) is never read on a stranger's machine."""
    try:
        check_scene_paths(scene, bundle)
    except ExternalPathError as exc:
        return (
            f"Providers will refuse this scene: {exc.message} Remove or fix that path in "
            "Blender (File > External Data > Report Missing Files), then submit again."
        )
    return None


def _ignore_progress(_: PackProgress) -> None:
    return None


def _pack(
    scene: Path, out_dir: Path, scratch: Path, project: Path | None, report: ProgressCallback
) -> PackResult:
    with _bat_errors(scene):
        existing = sorted(_existing_dependencies(scene))
    if project is None:
        project = _project_folder(scene, existing)
    target = scratch / "bundle"
    callback = _ProgressForwarder(report)
    with _bat_errors(scene), _BundlePacker(scene, project, str(target)) as packer:
        packer.progress_cb = callback
        packer.strategise()
        packer.execute()
        missing = tuple(sorted(packer.missing_files))
        scene_path = pathlib.PurePath(packer.output_path).relative_to(target).as_posix()
    (target / BAT_INFO_FILE).unlink(missing_ok=True)
    warnings = [f"Missing file: {path}" for path in missing]
    outside = target / OUTSIDE_PROJECT
    if outside.is_dir():
        warnings.append(
            f"Some files lie outside {project} and have no folder in common with the scene; "
            f"they are packed under {OUTSIDE_PROJECT}/ with their full path."
        )
    refusal = _provider_refusal(target / scene_path, target)
    if refusal is not None:
        warnings.append(refusal)
    _store_blends_uncompressed(target)
    files = sorted(path.relative_to(target).as_posix() for path in _walk_files(target))
    zip_path, sha256, size = _write_zip(target, files, out_dir, scratch, report)
    return PackResult(
        zip_path=zip_path,
        sha256=sha256,
        size=size,
        scene_path=scene_path,
        files=tuple(files),
        missing=missing,
        warnings=tuple(warnings),
        project=project,
    )


class _BundlePacker(Packer):
    """BAT's directory packer, but a dependency inside the project folder that a .blend
    names by an absolute path keeps its place in the project tree; BAT alone would move
    it under `_outside_project/` with its full path (leaking the folder layout).

    Closing it also stops BAT's copier thread: BAT leaves it running when copying fails
    with anything but Ctrl-C, and a process with that thread alive never exits."""

    _copier: transfer.FileTransferer | None = None

    def _create_file_transferer(self) -> transfer.FileTransferer:
        self._copier = super()._create_file_transferer()
        return self._copier

    def close(self) -> None:
        if self._copier is not None and self._copier.is_alive():
            self._copier.abort_and_join()
        super().close()

    def _find_new_paths(self) -> None:
        project = bpathlib.make_absolute(self.project)
        for path in self._new_location_paths:
            absolute = bpathlib.make_absolute(path)
            if absolute.is_relative_to(project):
                new_path = pathlib.Path(self._target_path, absolute.relative_to(project))
            else:
                new_path = pathlib.Path(
                    self._target_path, OUTSIDE_PROJECT, bpathlib.strip_root(absolute)
                )
            self._actions[path].new_path = new_path


class _ProgressForwarder(pack_progress.Callback):
    """Turns BAT's callbacks into `PackProgress` reports (always on the packing thread:
    BAT queues the copier thread's reports and flushes them on the caller's)."""

    def __init__(self, report: ProgressCallback) -> None:
        self._report = report
        self._traced = 0

    def trace_asset(self, filename: pathlib.Path) -> None:
        self._traced += 1
        self._report(PackProgress("trace", self._traced, 0, str(filename)))

    def transfer_progress(self, total_bytes: int, transferred_bytes: int) -> None:
        self._report(PackProgress("copy", transferred_bytes, total_bytes))


@contextlib.contextmanager
def _bat_errors(scene: Path) -> Iterator[None]:
    """Turn BAT's exceptions into Tessera errors that say which file is at fault."""
    try:
        yield
    except TesseraError:
        raise
    except BlendFileError as exc:
        culprit = Path(exc.filepath)
        reason = exc.args[0] if exc.args else str(exc)
        if _same_file(culprit, scene):
            raise CorruptSceneError(f"{scene} is damaged or truncated ({reason}).") from exc
        raise BundleError(
            f"The library {culprit} used by {scene.name} is not a readable .blend file ({reason}).",
            hint="Open the scene in Blender, fix or remove the broken library link, and save.",
        ) from exc
    except (struct.error, EOFError) as exc:
        raise CorruptSceneError(
            f"{scene} (or a library it links) is truncated or damaged ({exc})."
        ) from exc
    except Aborted as exc:
        raise BundleError(f"Packing {scene.name} failed: {exc or 'aborted'}.") from exc
    except OSError as exc:
        if "ZStandard" in str(exc):
            raise BundleError(
                f"{scene.name} (or a library it links) is zstd-compressed and the zstandard "
                "module is not installed.",
                hint="Install it: `pip install zstandard`.",
            ) from exc
        raise BundleError(
            f"Cannot read or write {exc.filename or scene} while packing: {exc.strerror or exc}.",
            hint="Check the file's permissions and that the disk is not full.",
        ) from exc
    except Exception as exc:
        # BAT parses files written by any Blender version; an unexpected structure must
        # still reach the user as a message, not a traceback (the log keeps the details).
        log.exception("blender-asset-tracer failed on %s", scene)
        raise BundleError(
            f"Could not trace the files {scene.name} uses ({type(exc).__name__}: {exc}).",
            hint="Open the scene in a current Blender and save it again; if that does not "
            "help, report the problem with the file attached.",
        ) from exc


#: What a dependency is, by the code of the datablock that uses it.
_DEPENDENCY_KINDS = {
    b"IM": "image",
    b"LI": "library",
    b"SO": "sound",
    b"MC": "movie clip",
    b"VF": "font",
    b"CF": "cache",
    b"VO": "volume",
}


@dataclass(frozen=True, slots=True)
class Dependency:
    """One file a scene uses (as blender-asset-tracer finds it), and whether it exists."""

    path: Path
    kind: str
    missing: bool


def list_dependencies(scene: Path) -> list[Dependency]:
    """Every file `scene` uses, libraries' own dependencies included, missing ones first.

    Reads the .blend with blender-asset-tracer (no Blender); a damaged scene or library
    raises the same errors as `pack_scene`."""
    found: dict[Path, Dependency] = {}
    with _bat_errors(scene):
        for usage in trace.deps(scene):
            path = bpathlib.make_absolute(usage.abspath)
            kind = _DEPENDENCY_KINDS.get(bytes(usage.block_name[:2]), "file")
            if usage.is_sequence:
                kind = f"{kind} sequence" if kind != "file" else "image sequence"
                try:
                    exists = any(p.is_file() for p in file_sequence.expand_sequence(path))
                except file_sequence.DoesNotExist:
                    exists = False
            else:
                exists = path.is_file()
            if path not in found or found[path].kind == "file":  # keep the telling kind
                found[path] = Dependency(path, kind, missing=not exists)
    return sorted(found.values(), key=lambda dep: (not dep.missing, str(dep.path)))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _existing_dependencies(scene: Path) -> Iterator[Path]:
    """Every dependency file that exists (libraries' own dependencies included)."""
    for usage in trace.deps(scene):
        if usage.is_sequence:
            try:
                yield from (p for p in file_sequence.expand_sequence(usage.abspath) if p.is_file())
            except file_sequence.DoesNotExist:
                continue
        elif usage.abspath.is_file():
            yield bpathlib.make_absolute(usage.abspath)


def _project_folder(scene: Path, dependencies: list[Path]) -> Path:
    """The deepest folder holding the scene and its dependencies, unless that is the
    filesystem root: then the scene's folder (and BAT's `_outside_project/` for the rest)."""
    folders = [str(scene.parent), *(str(path.parent) for path in dependencies)]
    common = Path(os.path.commonpath(folders))
    if common == Path(common.anchor):
        return scene.parent
    return common


def _walk_files(root: Path) -> Iterator[Path]:
    for folder, _dirs, names in os.walk(root):
        for name in names:
            yield Path(folder) / name


def _store_blends_uncompressed(root: Path) -> None:
    """Store gzip-compressed .blend files plain (Blender reads both; the zip deflates).

    BAT re-compresses a .blend it rewrote with gzip, whose header holds the time and a
    random temporary name: left alone, the bundle's hash would change on every pack.
    """
    for path in _walk_files(root):
        if not path.name.lower().endswith(".blend"):
            continue
        with path.open("rb") as handle:
            if handle.read(2) != GZIP_MAGIC:
                continue
        plain = path.with_name(path.name + ".plain")
        with gzip.open(path, "rb") as source, plain.open("wb") as sink:
            shutil.copyfileobj(source, sink, CHUNK)
        plain.replace(path)


def _write_zip(
    root: Path, files: list[str], out_dir: Path, scratch: Path, report: ProgressCallback
) -> tuple[Path, str, int]:
    total = sum((root / name).stat().st_size for name in files)
    written = 0
    partial = scratch / "bundle.zip"
    try:
        with zipfile.ZipFile(partial, "w", allowZip64=True) as archive:
            for name in files:
                source = root / name
                size = source.stat().st_size
                info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
                info.create_system = 3  # Unix, whatever packs it, so the hash is the same
                info.external_attr = 0o100644 << 16
                suffix = Path(name).suffix.lower()
                info.compress_type = (
                    zipfile.ZIP_STORED if suffix in STORE_SUFFIXES else zipfile.ZIP_DEFLATED
                )
                with (
                    source.open("rb") as reader,
                    archive.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as writer,
                ):
                    for block in iter(lambda: reader.read(CHUNK), b""):
                        writer.write(block)
                        written += len(block)
                        report(PackProgress("zip", written, total, name))
        digest = hashlib.sha256()
        with partial.open("rb") as handle:
            for block in iter(lambda: handle.read(CHUNK), b""):
                digest.update(block)
        sha256 = digest.hexdigest()
        final = out_dir / f"{sha256}.zip"
        size = partial.stat().st_size
        partial.replace(final)
    except OSError as exc:
        raise BundleError(
            f"Cannot write the bundle in {out_dir}: {exc.strerror or exc}.",
            hint="Check that the folder is writable and the disk is not full.",
        ) from exc
    return final, sha256, size
