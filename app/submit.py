"""Sending a scene to the farm: inspect and probe it (`app.job_spec`), pack it into a
bundle (`app.packing`), upload the bundle (skipped when the coordinator already has its
hash) and submit the job. The library under `tessera submit`/`render` and the desktop
app's Submit page; following the job afterwards is `app.follow`'s.

Each step is callable alone and reports through callbacks (nothing here prints). No Qt.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from app.job_spec import DEFAULT_OPTIONS, describe_job, job_spec_for, spec_with_bundle
from app.packing import PackProgress, PackResult, pack_scene
from common.errors import BundleError, CoordinatorUnreachableError, UsageError
from protocol.client import TesseraClient
from protocol.models import Job, JobOptions, JobSpec
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.scene_probe import SceneProbe
from renderers.worker import RenderWorker


@dataclass(frozen=True, slots=True)
class Prepared:
    """A scene inspected, packed and described by a job spec, ready to submit."""

    info: SceneInfo
    bundle: PackResult
    spec: JobSpec
    #: Files the scene refers to that do not exist (Blender's and BAT's findings).
    missing: tuple[Path, ...]
    #: Everything worth telling the user before submitting (missing files included).
    warnings: tuple[str, ...]
    #: The submit-time probe (None when `probe=False`); its cost and previews are in `spec`.
    probe: SceneProbe | None = None


def bundle_folder(bundles: Path) -> tempfile.TemporaryDirectory[str]:
    """A folder of this submission's own under `bundles` for packing, deleted after use
    (the coordinator keeps the bundle; a local copy would only fill the disk)."""
    # We list missing files ourselves; BAT would also log each one, several times.
    logging.getLogger("blender_asset_tracer").setLevel(logging.ERROR)
    try:
        bundles.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="submit-", dir=bundles)
    except OSError as exc:
        raise UsageError(
            f"Cannot create a folder for the bundle in {bundles}: {exc.strerror or exc}.",
            hint="Point TESSERA_HOME at a writable folder.",
        ) from exc


def prepare_submission(
    worker: RenderWorker,
    scene: Path,
    options: JobOptions = DEFAULT_OPTIONS,
    *,
    bundle_dir: Path,
    on_pack: Callable[[PackProgress], None] | None = None,
    probe: bool = True,
    benchmark_scene: Path | None = None,
    measured: SceneProbe | None = None,
    benchmark_memo: MutableMapping[str, float] | None = None,
) -> Prepared:
    """Inspect `scene`, check the job it makes, probe it, and pack it into
    `bundle_dir/<sha>.zip`.

    `options.frames` is "N", "A-B" or "A-BxSTEP" (default: the scene's own range);
    `None` for samples, percentage and denoise keeps the scene's settings. The probe (skipped with
    `probe=False`, leaving the spec's defaults: cost 1.0, no previews) renders with the
    same worker and sets the spec's `scene_cost` and `previews`; `benchmark_scene` is
    the scene it compares against (default: the demo scene) and `benchmark_memo` its
    figure remembered on this machine (`app.probe_memo`); `measured`, a probe made
    before, is reused when it fits (`describe_job`). Raises a `SceneError` for a scene
    that cannot render, `UsageError` for options that do not fit it, the worker's
    errors when a probe render fails, and `BundleError` when packing fails; nothing is
    uploaded here.
    """
    # Inspect and check the options first: a bad option fails in a second, before any
    # packing. Then the bundle is packed (files, no Blender) while the worker probes.
    info = inspect_scene(worker, scene)
    job_spec_for(info, options)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack") as pool:
        packing = pool.submit(pack_scene, scene, bundle_dir, on_progress=on_pack)
        try:
            described = describe_job(
                worker,
                scene,
                options,
                probe=probe,
                benchmark_scene=benchmark_scene,
                measured=measured,
                info=info,
                benchmark_memo=benchmark_memo,
            )
        except BaseException:
            packing.cancel()
            raise
        bundle = packing.result()
    spec = spec_with_bundle(
        info,
        bundle.sha256,
        bundle.scene_path,
        described.spec.model_dump(exclude={"bundle", "scene_path", "scene"}),
    )
    missing = _merge_missing(info.missing_files, bundle.missing)
    warnings = [w for w in info.warnings if not w.startswith("Missing file: ")]
    warnings.extend(w for w in bundle.warnings if not w.startswith("Missing file: "))
    warnings.extend(f"Missing file: {path}" for path in missing)
    return Prepared(info, bundle, spec, missing, tuple(warnings), described.probe)


def _merge_missing(from_blender: tuple[str, ...], from_bat: tuple[Path, ...]) -> tuple[Path, ...]:
    paths = {Path(p).absolute() for p in from_blender if p} | {p.absolute() for p in from_bat}
    return tuple(sorted(paths))


def submit(
    client: TesseraClient,
    prepared: Prepared,
    on_upload: Callable[[int, int], None] | None = None,
) -> Job:
    """Upload the bundle unless the coordinator has it (then `on_upload` is never called),
    and submit the job. Raises `ApiError` if the coordinator refuses the job."""
    bundle = prepared.bundle
    try:
        client.upload_bundle(bundle.zip_path, bundle.sha256, on_progress=on_upload)
    except requests.RequestException as exc:  # (an OSError too) broke off mid-upload
        raise CoordinatorUnreachableError(
            f"Uploading the bundle to {client.base_url} failed ({exc})."
        ) from exc
    except OSError as exc:  # the bundle vanished or cannot be read
        raise BundleError(
            f"Cannot read the bundle {bundle.zip_path}: {exc.strerror or exc}.",
            hint="Pack the scene again (run the submit again).",
        ) from exc
    return client.submit_job(prepared.spec)
