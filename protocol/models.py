"""Wire models shared by the coordinator, the nodes and the clients (API v1).

Every request and response body of the HTTP API is one of these pydantic models, so the
OpenAPI document, the server's validation and the client's parsing cannot drift apart.
Models reject unknown fields (`extra="forbid"`): a typo in a job spec is an error with
the field's name, not a silently ignored option.

This module holds data shapes and their validation only: no I/O, no Blender, no Qt.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from protocol.base import Sha256, Strict
from protocol.output import MovieOutput
from protocol.requirements import (
    MAX_MEMORY_GB,
    MAX_MEMORY_MIB,
    MAX_NODE_GPUS,
    MAX_NODE_POOLS,
    POOL_NAME_PATTERN,
    PRINTABLE_PATTERN,
    JobRequirements,
)

API_PREFIX = "/api/v1"
MAX_TILES_PER_AXIS = 64
MAX_FRAMES_PER_JOB = 100_000
MAX_SAMPLES = 1 << 20
#: Blender's frame numbers (MINAFRAME..MAXFRAME).
MIN_FRAME, MAX_FRAME = -1_048_574, 1_048_574
#: The largest side of a rendered frame, in pixels (after the resolution percentage).
MAX_FRAME_SIDE = 65536
#: Credits per work unit a job may offer or a node ask, at most.
MAX_PRICE = 1e6
#: Any amount of credits on the wire (a grant, a job's max_credits), at most: far below
#: what the ledger's 64-bit milli-credits hold.
MAX_CREDITS = 1e12
#: The largest magnitude of a float32 (what an EXR pixel can hold).
MAX_FLOAT32 = 3.4028234663852886e38
DEVICE_CLASSES = ("CPU", "GPU", "CUDA", "OPTIX", "HIP", "METAL", "ONEAPI")
#: What a job may ask for: a device class, or "ANY" (the farm picks; today that is CPU,
#: so that the tiles of one frame never mix device classes).
DEVICES = ("ANY", *DEVICE_CLASSES)
JobDevice = Literal["ANY", "CPU", "GPU", "CUDA", "OPTIX", "HIP", "METAL", "ONEAPI"]


# --- states (modelled on Flamenco's) ----------------------------------------------------


class JobStatus(StrEnum):
    QUEUED = "queued"
    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


class TaskStatus(StrEnum):
    QUEUED = "queued"
    ACTIVE = "active"
    SOFT_FAILED = "soft-failed"
    #: Uploaded and structurally sound; waiting for a duplicate sample to agree.
    CHECKING = "checking"
    COMPLETED = "completed"
    #: A verify task whose window lost arbitration (its provider is not paid).
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELED = "canceled"
    PAUSED = "paused"


class TaskKind(StrEnum):
    RENDER = "render"
    DENOISE = "denoise"
    #: A small window of another provider's tile, rendered again to check it.
    VERIFY = "verify"
    #: A second render of a tile a slow node is holding up; the first result wins.
    BACKUP = "backup"
    #: A merged frame made into the scene's own files (compositor, colour, format, name).
    FINISH = "finish"


class FrameStatus(StrEnum):
    """Where one frame of a job stands (the coordinator's `frames` table)."""

    #: Some of its tiles are still to be rendered or checked.
    PENDING = "pending"
    #: Every tile is in; the merged frame waits for its denoise task.
    DENOISING = "denoising"
    #: The merged (and denoised) frame waits for its finish task: the scene's own files.
    FINISHING = "finishing"
    DONE = "done"


class FailureKind(StrEnum):
    """Why a node could not finish a task, as it reports it (`TaskFailure.kind`).

    The node maps its exceptions to these names; the coordinator decides from them alone
    whether another node might succeed. Never a Python class name on the wire.
    """

    NO_CAMERA = "no_camera"
    CORRUPT_SCENE = "corrupt_scene"
    UNSUPPORTED_ENGINE = "unsupported_engine"
    SCENE_NOT_FOUND = "scene_not_found"
    UNSAFE_BUNDLE = "unsafe_bundle"
    BUNDLE = "bundle"
    RENDER_FAILED = "render_failed"
    RENDER_TIMEOUT = "render_timeout"
    WORKER_CRASHED = "worker_crashed"
    OUT_OF_MEMORY = "out_of_memory"
    DEVICE_UNAVAILABLE = "device_unavailable"
    BLENDER_NOT_FOUND = "blender_not_found"
    EXR = "exr"
    LEASE = "lease"
    OTHER = "other"

    @property
    def scene_fault(self) -> bool:
        """True for errors of the scene itself, which no other node will fix."""
        return self in SCENE_FAULTS


SCENE_FAULTS = frozenset(
    {FailureKind.NO_CAMERA, FailureKind.CORRUPT_SCENE, FailureKind.UNSUPPORTED_ENGINE}
)


class Role(StrEnum):
    REQUESTER = "requester"
    PROVIDER = "provider"
    ADMIN = "admin"


FINISHED_JOB_STATES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED})


# --- what the client knows about the scene ----------------------------------------------


class SceneSummary(Strict):
    """What the submitter's inspection found; the coordinator checks it against the spec."""

    name: str = Field(min_length=1, max_length=200)
    frame_start: int = Field(ge=MIN_FRAME, le=MAX_FRAME)
    frame_end: int = Field(ge=MIN_FRAME, le=MAX_FRAME)
    resolution_x: int = Field(ge=1, le=65536)
    resolution_y: int = Field(ge=1, le=65536)
    resolution_percentage: int = Field(ge=1, le=32767)
    samples: int = Field(ge=1, le=MAX_SAMPLES)
    adaptive_sampling: bool
    #: Cycles' adaptive threshold and minimum samples (0: automatic): they fix how many
    #: pixels a tile's margin needs (renderers.regions.render_margin). None: unknown, and
    #: the margin assumes the most filter passes Cycles can make.
    adaptive_threshold: float | None = Field(default=None, ge=0, le=1)
    adaptive_min_samples: int | None = Field(default=None, ge=0, le=MAX_SAMPLES)
    denoising: bool
    camera: str | None
    engine: str = "CYCLES"
    blender_version: str = ""
    fps: float = Field(default=24.0, gt=0, le=1000)
    #: The scene's movie output, when its format is a movie (FFMPEG): the farm finishes
    #: lossless frames and encodes them into this movie when the job's last frame is done.
    movie: MovieOutput | None = None


# --- jobs ------------------------------------------------------------


class FrameRange(Strict):
    start: int = Field(ge=MIN_FRAME, le=MAX_FRAME)
    end: int = Field(ge=MIN_FRAME, le=MAX_FRAME)
    step: int = Field(default=1, ge=1, le=MAX_FRAME - MIN_FRAME + 1)

    @model_validator(mode="after")
    def _ordered(self) -> FrameRange:
        if self.end < self.start:
            raise ValueError(f"frames {self.start}-{self.end}: the end is before the start")
        if len(self.frames()) > MAX_FRAMES_PER_JOB:
            raise ValueError(f"at most {MAX_FRAMES_PER_JOB} frames per job")
        return self

    def frames(self) -> range:
        return range(self.start, self.end + 1, self.step)

    @classmethod
    def parse(cls, text: str) -> FrameRange:
        """'7', '1-24' or '1-24x2' (every second frame)."""
        match = re.fullmatch(r"\s*(-?\d+)(?:\s*-\s*(-?\d+)(?:\s*x\s*(\d+))?)?\s*", text)
        if match is None:
            raise ValueError(f"'{text}' is not a frame range: use N, A-B or A-BxSTEP")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        step = int(match.group(3)) if match.group(3) is not None else 1
        return cls(start=start, end=end, step=step)


class TileGrid(Strict):
    columns: int = Field(default=1, ge=1, le=MAX_TILES_PER_AXIS)
    rows: int = Field(default=1, ge=1, le=MAX_TILES_PER_AXIS)


MAX_PREVIEW_PIXELS = 64 * 64
MAX_PREVIEW_FRAMES = 8


class FramePreview(Strict):
    """A tiny render of one frame made at submit time (linear luminance, row 0 at the top).

    The coordinator uses it to doubt a black or flat tile where the scene is not (another
    provider then checks the tile; the preview alone never refuses one)."""

    frame: int = Field(ge=MIN_FRAME, le=MAX_FRAME)
    width: int = Field(ge=1, le=64)
    height: int = Field(ge=1, le=64)
    luminance: list[Annotated[float, Field(ge=-MAX_FLOAT32, le=MAX_FLOAT32)]] = Field(
        max_length=MAX_PREVIEW_PIXELS
    )

    @model_validator(mode="after")
    def _sized(self) -> FramePreview:
        if len(self.luminance) != self.width * self.height:
            raise ValueError(
                f"a {self.width}x{self.height} preview needs {self.width * self.height}"
                f" luminance values, not {len(self.luminance)}"
            )
        return self


class JobOptions(Strict):
    """What an artist chooses for a job, before the scene is known: the CLI's flags, the
    app's Submit page and the add-on's panel all fill one of these, and the client turns
    it into a `JobSpec` once the scene is inspected."""

    frames: str | None = Field(default=None, description="'7', '1-24' or '1-24x2'; None: all")
    tiles: TileGrid = TileGrid()
    samples: int | None = Field(default=None, ge=1, le=MAX_SAMPLES)
    percentage: int | None = Field(default=None, ge=1, le=32767)
    priority: int = Field(default=50, ge=0, le=100)
    denoise: bool | None = None
    device: JobDevice = "ANY"
    name: str | None = Field(default=None, min_length=1, max_length=200)
    max_price: float = Field(default=0.0, ge=0, le=MAX_PRICE)
    max_credits: float | None = Field(default=None, ge=0, le=MAX_CREDITS)
    #: Also assemble the finished frames into an H.264 MP4 preview.
    preview_video: bool = False
    #: Make the scene's own files (compositor, colour management, format, names).
    finish: bool = True
    #: GPU memory (decimal GB) a node's GPU must have; None: from the probe (with a
    #: margin, see `app.job_spec`), 0: no requirement.
    min_vram_gb: float | None = Field(default=None, ge=0, le=MAX_MEMORY_GB)
    #: Memory (decimal GB) the node must have; None: from the probe, 0: none.
    min_ram_gb: float | None = Field(default=None, ge=0, le=MAX_MEMORY_GB)
    #: Part of the GPU's name the node must have (case-insensitive), e.g. "RTX 4090".
    gpu: str | None = Field(default=None, min_length=1, max_length=100, pattern=PRINTABLE_PATTERN)
    #: The pool whose nodes alone may render the job (None: any node).
    pool: str | None = Field(default=None, pattern=POOL_NAME_PATTERN)
    #: Let nodes of any Blender series render it (default: only the series, major.minor,
    #: that saved the scene; `JobSpec.blender_version`).
    any_blender: bool = False


class JobSpec(Strict):
    """What a requester submits. The bundle must already be uploaded."""

    name: str = Field(min_length=1, max_length=200)
    bundle: Sha256
    scene_path: str = Field(
        min_length=1,
        max_length=1000,
        description="path of the .blend inside the bundle, '/'-separated",
    )
    scene: SceneSummary
    frames: FrameRange
    tiles: TileGrid = TileGrid()
    samples: int | None = Field(default=None, ge=1, le=MAX_SAMPLES)
    percentage: int | None = Field(default=None, ge=1, le=32767)
    denoise: bool | None = None
    priority: int = Field(default=50, ge=0, le=100)
    device: JobDevice = "ANY"
    #: The Blender series ("5.0") whose builds may render it; None: any build.
    blender_version: str | None = Field(default=None, max_length=40)
    max_price: float = Field(
        default=0, ge=0, le=MAX_PRICE, description="credits per work unit, at most"
    )
    max_credits: float | None = Field(
        default=None,
        ge=0,
        le=MAX_CREDITS,
        description="refuse the job if its estimated cost is higher",
    )
    scene_cost: float = Field(
        default=1.0,
        ge=0.01,
        le=1000.0,
        description="render time per pixel-sample relative to the benchmark scene, measured"
        " at submit; work units are pixels x samples / 1e6 x scene_cost",
    )
    previews: list[FramePreview] = Field(default_factory=list, max_length=MAX_PREVIEW_FRAMES)
    preview_video: bool = False
    #: Make each frame into the scene's own files on a node (the finish step). Off for a
    #: bare API spec (raw EXRs only); the CLI, the app and the add-on ask for it.
    finish: bool = False
    requirements: JobRequirements = JobRequirements()

    @field_validator("scene_path")
    @classmethod
    def _relative_blend(cls, value: str) -> str:
        parts = value.split("/")
        if value.startswith("/") or ".." in parts or "\\" in value:
            raise ValueError("scene_path must be a relative path inside the bundle")
        if not value.lower().endswith(".blend"):
            raise ValueError(f"scene_path '{value}' is not a .blend file")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.scene.camera is None:
            raise ValueError(
                "the scene has no active camera: set one in Blender (Ctrl+Numpad0) and save"
            )
        if self.scene.engine != "CYCLES":
            raise ValueError(f"the scene uses {self.scene.engine}; the farm renders Cycles only")
        first, last = self.frames.start, self.frames.end
        if first < self.scene.frame_start or last > self.scene.frame_end:
            raise ValueError(
                f"frames {first}-{last} are outside the scene's range "
                f"{self.scene.frame_start}-{self.scene.frame_end}"
            )
        width, height = self.effective_size()
        if width > MAX_FRAME_SIDE or height > MAX_FRAME_SIDE:
            raise ValueError(
                f"a {width}x{height} frame is larger than {MAX_FRAME_SIDE} pixels on a side:"
                " lower the resolution percentage"
            )
        if self.tiles.columns > width or self.tiles.rows > height:
            raise ValueError(
                f"{self.tiles.columns}x{self.tiles.rows} tiles do not fit a {width}x{height} frame"
            )
        if self.requirements.gpu and self.device in ("ANY", "CPU"):
            raise ValueError(
                f"gpu '{self.requirements.gpu}' asks for a GPU but the job renders on"
                f" {self.device}: choose a GPU device (--device GPU, CUDA, OPTIX...)"
            )
        return self

    @property
    def effective_samples(self) -> int:
        """The samples every render task uses: the spec's override, else the scene's."""
        return self.samples or self.scene.samples

    @property
    def effective_percentage(self) -> int:
        return self.percentage or self.scene.resolution_percentage

    def effective_size(self) -> tuple[int, int]:
        """The frame's size in pixels after the resolution percentage (Blender's rounding)."""
        percentage = self.effective_percentage
        return (
            max(1, self.scene.resolution_x * percentage // 100),
            max(1, self.scene.resolution_y * percentage // 100),
        )

    @property
    def wants_denoise(self) -> bool:
        return self.scene.denoising if self.denoise is None else self.denoise


class FrameState(Strict):
    """Where one frame of a job stands, as the coordinator keeps it."""

    frame: int
    status: FrameStatus
    #: Render tiles of the frame accepted so far, of `tiles`.
    tiles_done: int = Field(ge=0)
    tiles: int = Field(ge=0)
    #: A finished frame's files by kind ("exr", "png"): their SHA-256, so a client can
    #: skip a file it already has and check the ones it downloads.
    files: dict[str, Sha256] = Field(default_factory=dict)


class JobProgress(Strict):
    tasks_total: int
    tasks_done: int
    frames_total: int
    frames_done: int


class JobCost(Strict):
    """What a job cost per successful frame (docs/billing.md). Exactly these keys, in
    `tessera job`, `tessera render/submit --json` (`cost`), the app and the add-on."""

    credits_per_frame: float | None = Field(
        default=None, description="credits paid so far / frames done (None before a frame)"
    )
    success_rate: float | None = Field(
        default=None, description="accepted task results / task results delivered"
    )
    wasted_seconds: float = Field(
        default=0.0,
        description="render time of rejected, failed, expired and losing backup work",
    )
    estimate: float = Field(default=0.0, description="credits escrowed at submit")
    final: float = Field(default=0.0, description="credits paid (the bill, once finished)")


class Job(Strict):
    id: str
    name: str
    owner: str
    status: JobStatus
    priority: int
    spec: JobSpec
    progress: JobProgress
    created_at: datetime
    updated_at: datetime
    message: str = ""
    frames_done: list[int] = Field(default_factory=list)
    credits_escrowed: float = Field(
        default=0.0, description="credits held for the job when it was submitted"
    )
    credits_spent: float = Field(default=0.0, description="credits paid for its accepted tasks")
    #: Set on the reply to a submit only: why no registered node meets the job's
    #: requirements now ("" when one does). The job is queued all the same.
    warning: str = ""
    cost: JobCost = Field(default_factory=JobCost)
    measured_scene_cost: float | None = Field(
        default=None, description="scene cost measured from its providers' renders"
    )
    verification_credits: float = Field(
        default=0.0, description="credits paid for duplicate samples (the price of checking)"
    )


class JobEstimate(Strict):
    """What a job spec would cost, as the coordinator would escrow it (nothing is held)."""

    credits: float = Field(description="the most the job can cost at its max price")
    balance: float = Field(description="the caller's balance now")
    max_credits: float | None = None
    #: Why the coordinator would refuse the job now, in words ("" when it would accept).
    refusal: str = ""
    refusal_hint: str = ""
    #: Why no registered node meets the job's requirements ("" when one does): the job
    #: would be accepted, and wait.
    warning: str = ""

    @property
    def accepted(self) -> bool:
        return not self.refusal


class JobPatch(Strict):
    priority: int | None = Field(default=None, ge=0, le=100)


# --- tasks and leases ------------------------------------------------------------


_Pixel = Annotated[int, Field(ge=0, le=MAX_FRAME_SIDE)]


class Region(Strict):
    """Pixel rectangle, half-open, origin top-left (see renderers.regions.PixelRect)."""

    x0: _Pixel
    y0: _Pixel
    x1: _Pixel
    y1: _Pixel


class RenderAssignment(Strict):
    """Everything a node needs to render one task; any node renders the same pixels.

    The render settings are explicit, never "the file's": a node forces `samples`,
    `percentage` and the full-frame `resolution_x` x `resolution_y` (the scene's size as
    the spec declared it, before the percentage) on the scene, so it renders exactly
    what the job was priced and paid for, whatever the .blend says.
    """

    frame: int = Field(ge=MIN_FRAME, le=MAX_FRAME)
    #: The frame's size after the percentage (the plan's, what regions refer to).
    width: int = Field(ge=1, le=MAX_FRAME_SIDE)
    height: int = Field(ge=1, le=MAX_FRAME_SIDE)
    render_region: Region
    core_region: Region
    whole_frame: bool
    #: Samples per pixel (the spec's override, else the scene's as declared).
    samples: int = Field(ge=1, le=MAX_SAMPLES)
    #: Resolution percentage (the spec's override, else the scene's as declared).
    percentage: int = Field(ge=1, le=32767)
    #: The scene's full-frame resolution, before the percentage, as the spec declared it.
    resolution_x: int = Field(ge=1, le=65536)
    resolution_y: int = Field(ge=1, le=65536)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    denoise_data: bool
    #: Whole frames denoise in Blender itself (no seams to avoid, no extra task).
    denoise_in_render: bool = False


class Task(Strict):
    id: str
    job_id: str
    kind: TaskKind
    frame: int
    tile_index: int
    status: TaskStatus
    attempts: int
    node: str | None = None
    message: str = ""
    result_sha256: str | None = None
    render_seconds: float | None = Field(default=None, ge=0)
    #: When its status last changed (None from coordinators older than this field).
    updated_at: datetime | None = None


class Lease(Strict):
    lease_id: str
    task: Task
    job_name: str
    bundle: Sha256
    bundle_size: int
    scene_path: str
    assignment: RenderAssignment | None = None
    denoise_input: Sha256 | None = None
    device: str
    samples: int = Field(description="effective samples (the spec's or the scene's)")
    #: The render size the job is made at (the spec's percentage, the scene's declared
    #: resolution): what a denoise or finish task, which has no assignment, works at.
    percentage: int | None = Field(default=None, ge=1, le=32767)
    resolution_x: int | None = Field(default=None, ge=1, le=65536)
    resolution_y: int | None = Field(default=None, ge=1, le=65536)
    expires_at: datetime
    heartbeat_interval: float
    #: The Blender series ("5.0") the job must render with; None: any build.
    blender_version: str | None = None


class Heartbeat(Strict):
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    message: str = Field(default="", max_length=500)


class HeartbeatReply(Strict):
    expires_at: datetime
    cancel: bool = False


class TaskFailure(Strict):
    kind: FailureKind
    message: str = Field(max_length=4000)
    retryable: bool = True


class UploadReceipt(Strict):
    task_id: str
    sha256: Sha256
    accepted: bool
    frame_completed: bool = False


# --- nodes ------------------------------------------------------------


class GpuInfo(Strict):
    type: str = Field(max_length=20)
    name: str = Field(max_length=200, pattern=PRINTABLE_PATTERN)
    vram_mib: int | None = Field(default=None, ge=0, le=MAX_MEMORY_MIB)


class NodeCapabilities(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=PRINTABLE_PATTERN)
    hostname: str = Field(default="", max_length=255, pattern=PRINTABLE_PATTERN)
    cpu: str = Field(default="", max_length=200, pattern=PRINTABLE_PATTERN)
    cpu_threads: int = Field(default=1, ge=1, le=1 << 20)
    ram_mib: int = Field(default=0, ge=0, le=MAX_MEMORY_MIB)
    devices: list[Annotated[str, Field(max_length=20, pattern=PRINTABLE_PATTERN)]] = Field(
        default_factory=lambda: ["CPU"],
        max_length=16,
        description="Cycles device types this node can render with",
    )
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=MAX_NODE_GPUS)
    blender_versions: list[Annotated[str, Field(max_length=40, pattern=PRINTABLE_PATTERN)]] = Field(
        default_factory=list, max_length=32
    )
    engines: list[Annotated[str, Field(max_length=20, pattern=PRINTABLE_PATTERN)]] = Field(
        default_factory=lambda: ["CYCLES"], max_length=8
    )
    benchmark_score: float | None = Field(default=None, ge=0, le=1e12)
    cpu_kernel: str = Field(default="", max_length=40, pattern=PRINTABLE_PATTERN)
    price: float = Field(default=0, ge=0, le=MAX_PRICE, description="credits per work unit")
    #: Pools the node asks to serve; the coordinator keeps those its owner was added to.
    pools: list[Annotated[str, Field(pattern=POOL_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=MAX_NODE_POOLS
    )


class NodeRegistration(Strict):
    node_id: str
    heartbeat_interval: float
    poll_timeout: float
    #: What the coordinator refused of the node's claims, in words (a pool its owner
    #: was not added to); the node registers all the same, without them.
    notices: list[str] = Field(default_factory=list)


class NodeInfo(Strict):
    id: str
    owner: str
    capabilities: NodeCapabilities
    status: Literal["idle", "busy", "paused", "warming", "failed", "offline"]
    #: Why a paused node takes no work (its provider's schedule, an active user...); for
    #: a "warming" or "failed" (warm-up failed) GPU worker, its progress or the reason.
    paused: str | None = None
    current_task: str | None = None
    last_seen: datetime
    tasks_completed: int = 0
    tasks_failed: int = 0
    render_seconds: float = 0.0
    earned: float = Field(default=0.0, description="credits paid for this node's tasks")
    #: The owning provider account's standing (shared by all its nodes).
    reputation: float = Field(default=1.0, ge=0.0, le=1.0)
    verified: int = Field(default=0, description="duplicate samples that agreed")
    rejected: int = Field(default=0, description="results refused by checks or samples")
    suspended: str | None = Field(default=None, description="why the provider is suspended")
    success_rate: float | None = Field(
        default=None, description="this node's accepted results / results it delivered"
    )
    accepted_seconds: float = Field(
        default=0.0, description="render time of this node's accepted results"
    )


Readiness = Literal["ready", "warming", "failed"]


class LeaseRequest(Strict):
    cached_bundles: list[Sha256] = Field(default_factory=list, max_length=1000)
    warm_bundles: list[Sha256] = Field(default_factory=list, max_length=100)
    wait: float = Field(default=20.0, ge=0.0, le=60.0)
    #: Set by a node that takes no work now (the user is active, outside its hours, a hot
    #: GPU, a full disk): why, in plain words. Such a request leases nothing; it keeps the
    #: node listed as paused, with the reason, instead of going offline.
    paused: str | None = Field(
        default=None, min_length=1, max_length=300, pattern=PRINTABLE_PATTERN
    )
    #: A GPU worker compiles its kernels with a warm-up render before it takes work:
    #: "warming" while it runs, "failed" when it failed (`paused` then says why). Such a
    #: request leases nothing either.
    readiness: Readiness = "ready"


# --- events ------------------------------------------------------------


class Event(Strict):
    """One entry of the live event stream (SSE `data:` payload)."""

    seq: int
    type: Literal["job", "task", "frame", "node"]
    job_id: str | None = None
    task_id: str | None = None
    frame: int | None = None
    status: str | None = None
    node: str | None = None
    url: str | None = Field(default=None, description="where to fetch the tile/frame preview")
    at: datetime


class ErrorBody(Strict):
    """The body of every 4xx/5xx reply: what is wrong and what to do."""

    error: str
    detail: str
    hint: str = ""


class Health(Strict):
    status: Literal["ok"]
    version: str
    api: str = "v1"
    farm: str | None = None
