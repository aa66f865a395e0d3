"""Build the Tessera Blender extension (`blender_addon/`) into a zip that Blender's
*Install from Disk* takes, and install it into a Blender.

The extension vendors blender-asset-tracer (packing) and zeroconf with ifaddr (finding a
LAN farm by name) as wheels: `build_wheel` rebuilds one from the installed distribution's
files (its dist-info RECORD lists them), so nothing is downloaded. zeroconf is installed
with optional Cython-compiled twins of its modules; the wheel leaves them out and keeps
the Python sources they were compiled from (zeroconf runs on those alone, as when built
with SKIP_CYTHON=1), so it is a py3-none-any wheel Blender can take on any platform. The
zip is reproducible: sorted entries and fixed timestamps.

`tessera addon build` / `tessera addon install` are thin wrappers around
`build_extension` and `install_extension`. No Qt, no bpy in this process: installing runs
Blender (an executable, or the bpy module in a fresh interpreter) as a subprocess.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import TesseraError

#: The extension's source folder (a sibling of app/ in the source tree).
SOURCE = Path(__file__).resolve().parent.parent / "blender_addon"
MANIFEST = "blender_manifest.toml"
#: Distributions vendored as wheels (pure Python; Blender ships requests and zstandard).
VENDORED = ("blender_asset_tracer", "zeroconf", "ifaddr")
#: Compiled files a wheel leaves out when each compiled module has its Python source.
COMPILED_SUFFIXES = (".so", ".pyd")
#: Build inputs of compiled modules that a pure-Python wheel has no use for.
CYTHON_SUFFIXES = (".pxd", ".pyx", ".c")
PURE_WHEEL = (
    "Wheel-Version: 1.0\nGenerator: tessera-addon-build\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
)
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
#: Files of the source folder that go into the extension.
SOURCE_SUFFIXES = (".py", ".toml", ".md", ".txt")
INSTALL_MARK = "TESSERA-INSTALL "


class AddonBuildError(TesseraError):
    """The extension could not be built or installed."""


def _zip_entry(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.create_system = 3
    info.external_attr = 0o100644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def _compiled_source(posix: str) -> str:
    """`pkg/_mod.py` for `pkg/_mod.cpython-311-x86_64-linux-gnu.so` (or `.pyd`)."""
    folder, _, name = posix.rpartition("/")
    stem = name.split(".", 1)[0]
    return f"{folder}/{stem}.py" if folder else f"{stem}.py"


def _pure_entries(distribution: str, entries: dict[str, bytes]) -> dict[str, bytes]:
    """`entries` without compiled modules and their Cython inputs; raises when a compiled
    module has no Python source to fall back on (the distribution needs its binaries)."""
    compiled = [key for key in entries if key.endswith(COMPILED_SUFFIXES)]
    lacking = [key for key in compiled if _compiled_source(key) not in entries]
    if lacking:
        raise AddonBuildError(
            f"{distribution} is not pure Python ({lacking[0]} has no Python source); it cannot"
            " be vendored."
        )
    return {
        key: data
        for key, data in entries.items()
        if not key.endswith(COMPILED_SUFFIXES + CYTHON_SUFFIXES)
    }


def build_wheel(distribution: str, out_dir: Path) -> Path:
    """A py3-none-any wheel of the installed `distribution`, rebuilt from the files its
    RECORD lists (compiled caches, scripts outside site-packages and the installer's
    own files left out; compiled twins of Python modules left out too). Returns the
    wheel's path in `out_dir`."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise AddonBuildError(
            f"{distribution} is not installed, so its wheel cannot be vendored.",
            hint="Install Tessera's dependencies (pip install -e .).",
        ) from exc
    wheel_meta = dist.read_text("WHEEL") or ""
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    version = dist.version
    dist_info = f"{name}-{version}.dist-info"
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    entries: dict[str, bytes] = {}
    for file in dist.files or ():
        posix = file.as_posix()
        if posix.startswith("../") or "__pycache__/" in posix or posix.endswith(".pyc"):
            continue
        parts = posix.split("/")
        if parts[0].endswith(".dist-info"):
            if parts[-1] in skip:
                continue
            posix = "/".join([dist_info, *parts[1:]])
        entries[posix] = Path(str(dist.locate_file(file))).read_bytes()
    if not any(not key.startswith(dist_info) for key in entries):
        raise AddonBuildError(f"The installed {distribution} has no files listed in its RECORD.")
    if "Root-Is-Purelib: true" not in wheel_meta:
        entries = _pure_entries(distribution, entries)
        entries[f"{dist_info}/WHEEL"] = PURE_WHEEL.encode()
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for key in sorted(entries):
        writer.writerow([key, _record_hash(entries[key]), len(entries[key])])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    entries[f"{dist_info}/RECORD"] = record.getvalue().encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        # The dist-info goes last, as wheel tools write it.
        for key in sorted(entries, key=lambda k: (k.startswith(dist_info), k)):
            _zip_entry(archive, key, entries[key])
    return wheel


def _manifest_with_wheels(text: str, wheels: list[str]) -> str:
    listed = ", ".join(f'"./wheels/{name}"' for name in wheels)
    line = f"wheels = [{listed}]"
    new, count = re.subn(r"(?m)^wheels\s*=\s*\[[^\]]*\]", line, text)
    if count == 0:
        new = text.replace("\n[permissions]", f"\n{line}\n\n[permissions]", 1)
    return new


def extension_version(source: Path = SOURCE) -> str:
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (source / MANIFEST).read_text())
    return match.group(1) if match else "0.0.0"


def build_extension(out: Path, *, source: Path = SOURCE) -> Path:
    """Build the extension zip: `out` is the zip's path (ending in .zip) or a folder to
    write `tessera-<version>.zip` in. Returns the zip's path."""
    if not (source / MANIFEST).is_file():
        raise AddonBuildError(
            f"The extension's source is not at {source} (no {MANIFEST}).",
            hint="Build from a Tessera source checkout.",
        )
    target = out if out.suffix == ".zip" else out / f"tessera-{extension_version(source)}.zip"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.parent / f".{target.name}.wheels"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            wheels = [build_wheel(dist, scratch) for dist in VENDORED]
            entries: dict[str, bytes] = {}
            for path in sorted(source.rglob("*")):
                relative = path.relative_to(source).as_posix()
                if (
                    not path.is_file()
                    or "__pycache__" in relative
                    or not path.name.endswith(SOURCE_SUFFIXES)
                ):
                    continue
                entries[relative] = path.read_bytes()
            manifest = entries[MANIFEST].decode()
            entries[MANIFEST] = _manifest_with_wheels(manifest, [w.name for w in wheels]).encode()
            for wheel in wheels:
                entries[f"wheels/{wheel.name}"] = wheel.read_bytes()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        partial = target.with_name(target.name + ".part")
        with zipfile.ZipFile(partial, "w") as archive:
            for name in sorted(entries):
                _zip_entry(archive, name, entries[name])
        partial.replace(target)
    except OSError as exc:
        raise AddonBuildError(
            f"Cannot write the extension to {target}: {exc.strerror or exc}."
        ) from exc
    return target


# --- install -------------------------------------------------------------------------

_INSTALL_SCRIPT = r"""
import json, sys
import bpy
zip_path = sys.argv[-1]
result = bpy.ops.extensions.package_install_files(
    filepath=zip_path, repo="user_default", enable_on_install=True, overwrite=True
)
enabled = any(name.endswith(".tessera") for name in bpy.context.preferences.addons.keys())
bpy.ops.wm.save_userpref()
print("TESSERA-INSTALL " + json.dumps({
    "result": sorted(result),
    "enabled": enabled,
    "extensions": bpy.utils.user_resource("EXTENSIONS"),
    "version": bpy.app.version_string,
}), flush=True)
"""


@dataclass(frozen=True, slots=True)
class InstallResult:
    """Where the extension went and which Blender took it."""

    blender: str
    blender_version: str
    extensions_dir: Path
    enabled: bool


def _install_command(
    blender: Path | None, script: Path, zip_path: Path, use_bpy: bool
) -> tuple[list[str], str]:
    has_bpy = importlib.util.find_spec("bpy") is not None
    if blender is None:
        found = None if use_bpy else shutil.which("blender")
        if found is not None:
            blender = Path(found)
        elif has_bpy:
            return [sys.executable, str(script), str(zip_path)], f"bpy module in {sys.executable}"
        else:
            raise AddonBuildError(
                "No Blender found to install the extension into.",
                hint="Pass --blender PATH, or install it from Blender: Edit > Preferences > "
                "Get Extensions > Install from Disk.",
            )
    command = [str(blender), "-b", "--python-exit-code", "1", "--python", str(script), "--"]
    return [*command, str(zip_path)], str(blender)


def install_extension(
    zip_path: Path,
    blender: Path | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
    use_bpy: bool = False,
) -> InstallResult:
    """Install and enable the extension zip in `blender` (an executable; default: the
    `blender` on PATH, else this interpreter's bpy module; `use_bpy`: the bpy module even
    when a `blender` is on PATH), into its user_default repository, and save its
    preferences (the bpy module shares a Blender of its version's user folder). `env`
    replaces the environment (tests point HOME and BLENDER_USER_RESOURCES at a scratch
    folder). Raises `AddonBuildError` when no Blender is found or the install fails."""
    zip_path = zip_path.resolve()
    if not zipfile.is_zipfile(zip_path):
        raise AddonBuildError(f"{zip_path} is not an extension zip.")
    script = zip_path.with_name(f".{zip_path.stem}-install.py")
    script.write_text(_INSTALL_SCRIPT)
    try:
        command, label = _install_command(blender, script, zip_path, use_bpy)
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env if env is not None else dict(os.environ),
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AddonBuildError(f"Running {label} failed: {exc}.") from exc
    finally:
        script.unlink(missing_ok=True)
    report = None
    for line in completed.stdout.splitlines():
        if line.startswith(INSTALL_MARK):
            report = json.loads(line[len(INSTALL_MARK) :])
    if completed.returncode != 0 or report is None or report["result"] != ["FINISHED"]:
        tail = (completed.stderr or completed.stdout)[-2000:]
        raise AddonBuildError(
            f"{label} could not install {zip_path.name} (exit code {completed.returncode}):"
            f"\n{tail}",
            hint="Install it from Blender instead: Edit > Preferences > Get Extensions > "
            "Install from Disk.",
        )
    return InstallResult(
        blender=label,
        blender_version=str(report["version"]),
        extensions_dir=Path(report["extensions"]),
        enabled=bool(report["enabled"]),
    )
