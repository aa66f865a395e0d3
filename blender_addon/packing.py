"""Pack the saved .blend and everything it uses into one zip bundle named by its SHA-256,
with blender-asset-tracer (vendored as a wheel), as the desktop client does.

The layout mirrors Tessera's `app/packing.py`: every path is relative to the deepest
folder holding the scene and its dependencies (dependencies with no folder in common go
under `_outside_project/`), paths inside the packed .blend files are rewritten relative,
and the zip is reproducible (sorted entries, fixed times, gzip-compressed .blend files
stored plain) so the same scene gives the same hash and the coordinator skips the upload.

No bpy here: it reads the file on disk, so it may run on a worker thread.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pathlib
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTSIDE_PROJECT = "_outside_project"
BAT_INFO_FILE = "pack-info.txt"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
STORE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".exr", ".mp4", ".mkv", ".mov", ".webm"})
GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1 << 20


class PackError(Exception):
    """The scene could not be packed; `str()` is the message to show."""


@dataclass(frozen=True)
class Bundle:
    zip_path: Path
    sha256: str
    size: int
    #: The .blend inside the zip, '/'-separated.
    scene_path: str
    files: tuple[str, ...]
    missing: tuple[str, ...]


def _bat() -> tuple[Any, Any, Any, Any]:
    try:
        from blender_asset_tracer import blendfile, bpathlib, trace
        from blender_asset_tracer.pack import Packer
    except ImportError as exc:  # the wheel did not install
        raise PackError(
            "blender-asset-tracer is missing: reinstall the Tessera extension (it ships the wheel)."
        ) from exc
    return blendfile, bpathlib, trace, Packer


def missing_dependencies(scene: Path) -> list[str]:
    """Every file the scene (and its libraries) refers to that does not exist."""
    _blendfile, bpathlib, trace, _packer = _bat()
    missing: set[str] = set()
    try:
        for usage in trace.deps(scene):
            path = bpathlib.make_absolute(usage.abspath)
            if usage.is_sequence:
                folder = path.parent
                if not folder.is_dir():
                    missing.add(str(path))
            elif not path.is_file():
                missing.add(str(path))
    except Exception as exc:
        raise PackError(f"Could not trace the files {scene.name} uses ({exc}).") from exc
    finally:
        _blendfile.close_all_cached()
    return sorted(missing)


def _existing(scene: Path) -> Iterator[Path]:
    _blendfile, bpathlib, trace, _packer = _bat()
    from blender_asset_tracer.trace import file_sequence

    for usage in trace.deps(scene):
        if usage.is_sequence:
            try:
                yield from (p for p in file_sequence.expand_sequence(usage.abspath) if p.is_file())
            except file_sequence.DoesNotExist:
                continue
        elif usage.abspath.is_file():
            yield bpathlib.make_absolute(usage.abspath)


def pack_scene(
    scene: Path, out_dir: Path, on_progress: Callable[[str, int, int], None] | None = None
) -> Bundle:
    """Pack `scene` into `out_dir/<sha256>.zip`. Raises `PackError`."""
    blendfile, bpathlib, _trace, packer_class = _bat()
    logging.getLogger("blender_asset_tracer").setLevel(logging.ERROR)
    report = on_progress or (lambda _stage, _done, _total: None)
    scene = scene.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".pack-", dir=out_dir) as scratch:
            existing = [str(p.parent) for p in _existing(scene)]
            common = Path(os.path.commonpath([str(scene.parent), *existing]))
            project = scene.parent if common == Path(common.anchor) else common
            target = Path(scratch) / "bundle"

            class BundlePacker(packer_class):
                """Keeps a dependency inside the project folder in its place even when a
                .blend names it by an absolute path."""

                def _find_new_paths(self) -> None:
                    root = bpathlib.make_absolute(self.project)
                    for path in self._new_location_paths:
                        absolute = bpathlib.make_absolute(path)
                        if absolute.is_relative_to(root):
                            new = pathlib.Path(self._target_path, absolute.relative_to(root))
                        else:
                            strip = bpathlib.strip_root
                            new = pathlib.Path(self._target_path, OUTSIDE_PROJECT, strip(absolute))
                        self._actions[path].new_path = new

            report("trace", 0, 0)
            with BundlePacker(scene, project, str(target)) as packer:
                packer.strategise()
                packer.execute()
                missing = tuple(sorted(str(p) for p in packer.missing_files))
                scene_path = pathlib.PurePath(packer.output_path).relative_to(target).as_posix()
            (target / BAT_INFO_FILE).unlink(missing_ok=True)
            _store_blends_plain(target)
            files = sorted(p.relative_to(target).as_posix() for p in _walk(target))
            zip_path, sha256, size = _write_zip(target, files, out_dir, Path(scratch), report)
    except PackError:
        raise
    except OSError as exc:
        raise PackError(
            f"Cannot read or write {exc.filename or scene} while packing: {exc.strerror or exc}."
        ) from exc
    except Exception as exc:
        raise PackError(
            f"Could not pack {scene.name} ({type(exc).__name__}: {exc}); save it in a current"
            " Blender and try again."
        ) from exc
    finally:
        blendfile.close_all_cached()
    return Bundle(zip_path, sha256, size, scene_path, tuple(files), missing)


def _walk(root: Path) -> Iterator[Path]:
    for folder, _dirs, names in os.walk(root):
        for name in names:
            yield Path(folder) / name


def _store_blends_plain(root: Path) -> None:
    for path in _walk(root):
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
    root: Path,
    files: list[str],
    out_dir: Path,
    scratch: Path,
    report: Callable[[str, int, int], None],
) -> tuple[Path, str, int]:
    total = sum((root / name).stat().st_size for name in files)
    written = 0
    partial = scratch / "bundle.zip"
    with zipfile.ZipFile(partial, "w", allowZip64=True) as archive:
        for name in files:
            source = root / name
            size = source.stat().st_size
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            stored = Path(name).suffix.lower() in STORE_SUFFIXES
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            with (
                source.open("rb") as reader,
                archive.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as writer,
            ):
                for block in iter(lambda: reader.read(CHUNK), b""):
                    writer.write(block)
                    written += len(block)
                    report("zip", written, total)
    digest = hashlib.sha256()
    with partial.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    sha256 = digest.hexdigest()
    final = out_dir / f"{sha256}.zip"
    partial.replace(final)
    return final, sha256, final.stat().st_size
