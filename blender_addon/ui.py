"""Preferences, the per-scene settings (`scene.tessera`) and the Output properties panel.

No `from __future__ import annotations` here: Blender reads the properties from the class
annotations, which must stay evaluated `bpy.props` calls, not strings.
"""

import socket
from typing import ClassVar

import bpy
from bpy.props import (
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from .spec import DEVICES, FINISHED

ADDON = __package__


def preferences() -> "TesseraPreferences":
    return bpy.context.preferences.addons[ADDON].preferences


class TesseraPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON

    coordinator_url: StringProperty(
        name="Coordinator URL",
        description="The farm's coordinator, e.g. http://farm.local:8400",
        default="http://127.0.0.1:8400",
    )
    token: StringProperty(
        name="Token",
        description="Your Tessera requester token (tessera account / the farm's admin)",
        subtype="PASSWORD",
    )
    join_name: StringProperty(
        name="Name on the farm",
        description="The name to join a LAN farm with (the account becomes lan-user-NAME)",
        default="".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())
        or "blender",
    )
    farm_name: StringProperty(
        name="Farm name",
        description="The LAN farm's name (its coordinator's --farm), found on the LAN with"
        " zeroconf; leave empty to join at the coordinator URL above",
    )
    lan_interface: StringProperty(
        name="LAN interface",
        description="Listen for LAN farms on this address only (e.g. 192.168.1.20);"
        " empty: every interface",
    )
    farm_secret: StringProperty(
        name="Farm secret",
        description="The secret the LAN farm's coordinator was started with (--secret)",
        subtype="PASSWORD",
    )
    connection_status: StringProperty(name="Connection")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "coordinator_url")
        layout.prop(self, "token")
        row = layout.row()
        row.operator("tessera.test_connection", icon="URL")
        if self.connection_status:
            layout.label(text=self.connection_status)
        box = layout.box()
        box.label(text="Or join a LAN farm by its name and secret (no name: at the URL above):")
        box.prop(self, "farm_name")
        box.prop(self, "farm_secret")
        box.prop(self, "join_name")
        box.prop(self, "lan_interface")
        box.operator("tessera.join_farm", icon="LINKED")


class TesseraSceneSettings(bpy.types.PropertyGroup):
    __slots__ = ()  # Blender 5 warns about property groups without slots

    use_scene_range: BoolProperty(
        name="Scene Frame Range", description="Render the scene's frame range", default=True
    )
    frames: StringProperty(name="Frames", description="'7', '1-24' or '1-24x2'", default="1")
    split: EnumProperty(
        name="Split",
        items=[
            ("FRAMES", "Whole Frames", "One task per frame"),
            ("TILES", "Tiles", "Split every frame into columns x rows tiles"),
        ],
        default="FRAMES",
    )
    tiles_x: IntProperty(name="Columns", default=2, min=1, max=64)
    tiles_y: IntProperty(name="Rows", default=2, min=1, max=64)
    priority: IntProperty(name="Priority", default=50, min=0, max=100)
    device: EnumProperty(
        name="Device", items=[(d, d.title() if d == "ANY" else d, "") for d in DEVICES]
    )
    max_price: FloatProperty(
        name="Max Price", description="Credits per work unit, at most", default=0.0, min=0.0
    )
    use_max_credits: BoolProperty(name="Limit Credits", default=False)
    max_credits: FloatProperty(
        name="Max Credits",
        description="Refuse the job if its estimated cost is higher",
        default=100.0,
        min=0.0,
    )
    preview_video: BoolProperty(
        name="Preview Video",
        description="Ask the farm for an MP4 preview of the finished frames (it comes home"
        " with the job's other files)",
        default=False,
    )
    allow_missing: BoolProperty(
        name="Submit With Missing Files",
        description="Submit even though some files the scene uses are missing",
        default=False,
    )
    # What the farm said (written by the add-on).
    estimate: StringProperty(name="Estimate")
    missing_files: StringProperty(name="Missing Files")
    last_job_id: StringProperty(name="Last Job")
    job_status: StringProperty(name="Status")
    job_message: StringProperty(name="Message")
    frames_done: IntProperty(name="Frames Done")
    frames_total: IntProperty(name="Frames Total")
    credits_spent: FloatProperty(name="Credits Spent")
    #: The job's cost per successful frame, success rate, waste, final vs estimate.
    job_cost: StringProperty(name="Cost")
    eta_seconds: FloatProperty(name="ETA", default=-1.0)
    last_frame_path: StringProperty(name="Last Frame", subtype="FILE_PATH")
    downloaded_frames: StringProperty(name="Downloaded Frames")
    downloaded_files: StringProperty(name="Downloaded Files")


class TESSERA_PT_submit(bpy.types.Panel):  # noqa: N801 (Blender naming)
    bl_label = "Tessera Render Farm"
    bl_idname = "TESSERA_PT_submit"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "output"
    bl_options: ClassVar[set[str]] = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        settings = context.scene.tessera
        layout.use_property_split = True
        layout.prop(settings, "use_scene_range")
        if not settings.use_scene_range:
            layout.prop(settings, "frames")
        layout.prop(settings, "split", expand=True)
        if settings.split == "TILES":
            row = layout.row(align=True)
            row.prop(settings, "tiles_x")
            row.prop(settings, "tiles_y")
        layout.prop(settings, "priority")
        layout.prop(settings, "device")
        layout.prop(settings, "max_price")
        row = layout.row(heading="Limit Credits")
        row.prop(settings, "use_max_credits", text="")
        sub = row.row()
        sub.active = settings.use_max_credits
        sub.prop(settings, "max_credits", text="")
        row = layout.row()
        row.operator("tessera.estimate", icon="INFO")
        if settings.estimate:
            row.label(text=settings.estimate)
        layout.prop(settings, "preview_video")
        if settings.missing_files:
            box = layout.box()
            box.label(text="Missing files:", icon="ERROR")
            for path in settings.missing_files.splitlines()[:10]:
                box.label(text=path)
            box.prop(settings, "allow_missing")
        layout.operator("tessera.submit_job", text="Submit to Tessera", icon="RENDER_ANIMATION")
        if settings.last_job_id:
            self._draw_job(layout, settings)

    @staticmethod
    def _draw_job(layout: bpy.types.UILayout, settings: "TesseraSceneSettings") -> None:
        box = layout.box()
        box.label(text=f"Job {settings.last_job_id}: {settings.job_status or '...'}")
        if settings.frames_total:
            box.label(text=f"Frames {settings.frames_done} / {settings.frames_total}")
        if settings.eta_seconds >= 0 and settings.job_status not in FINISHED:
            minutes, seconds = divmod(int(settings.eta_seconds), 60)
            box.label(text=f"ETA {minutes}:{seconds:02d}")
        box.label(text=f"Credits spent {settings.credits_spent:.2f}")
        for line in settings.job_cost.splitlines():
            box.label(text=line)
        if settings.job_message:
            box.label(text=settings.job_message, icon="INFO")
        row = box.row(align=True)
        row.operator("tessera.pause_job", icon="PAUSE")
        row.operator("tessera.resume_job", icon="PLAY")
        row.operator("tessera.cancel_job", icon="CANCEL")
        row = box.row(align=True)
        row.operator("tessera.refresh_job", icon="FILE_REFRESH")
        row.operator("tessera.open_last_frame", icon="IMAGE")


CLASSES = (TesseraPreferences, TesseraSceneSettings, TESSERA_PT_submit)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.tessera = PointerProperty(type=TesseraSceneSettings)


def unregister() -> None:
    del bpy.types.Scene.tessera
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
