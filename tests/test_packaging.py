"""The packaging files (packaging/, resources/icons/, docs/deployment.md) agree with the code.

No build happens here (no PyInstaller, docker or systemd needed): each file is parsed the
way its consumer would, and every `tessera ...` command line in it (the desktop entry's
Exec, the units' ExecStart, the container's ENTRYPOINT + CMD, compose commands, the
deployment guide's examples) goes through the CLI's own argparse parser, so renaming or
removing an option breaks this test instead of a farm.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import dataclasses
import importlib.util
import json
import re
import shlex
import struct
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from app.cli import build_parser
from common.settings import Settings
from farm_node.config import NodeConfig
from renderers.demo_scene import DEMO_SCRIPT
from renderers.worker import WORKER_SCRIPT

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
SYSTEMD = PACKAGING / "systemd"
CONTAINER = PACKAGING / "container"
ICONS = REPO / "resources" / "icons"

SYSTEM_UNITS = ["tessera-coordinator.service", "tessera-node.service"]
NODE_UNITS = ["tessera-node.service", "user/tessera-node.service"]
ALL_UNITS = [*SYSTEM_UNITS, "user/tessera-node.service"]
#: The subcommand each unit runs.
UNIT_COMMANDS = {
    "tessera-coordinator.service": "cmd_coordinator",
    "tessera-node.service": "cmd_node",
    "user/tessera-node.service": "cmd_node",
}
#: Variables in the env files that are not `Settings` fields: read by the CLI itself
#: (TESSERA_FARM_SECRET), or expanded into ExecStart by systemd.
NON_SETTINGS_VARIABLES = {"TESSERA_FARM_SECRET", "TESSERA_NODE_ARGS", "TESSERA_COORDINATOR_ARGS"}
ICON_SIZES = (64, 128, 256)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SVG_NS = "{http://www.w3.org/2000/svg}"
#: Seconds a stopping node may spend beyond `stop_grace`: an upload and the lease release.
STOP_MARGIN = 30.0
#: What %h stands for when a user unit is checked.
FAKE_HOME = "/home/someone"


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """`tessera ARGV` parsed by the real CLI parser; a usage error fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"`tessera {shlex.join(argv)}` does not parse (exit {exit_.code})")


def stop_grace() -> float:
    """The seconds a stopping node gives its current task (NodeConfig's default)."""
    grace = next(f for f in dataclasses.fields(NodeConfig) if f.name == "stop_grace").default
    assert isinstance(grace, float)
    return grace


def handler_name(args: argparse.Namespace) -> str:
    handler = getattr(args, "handler", None)
    assert handler is not None, f"{args} names no command"
    return str(handler.__name__)


def script_name() -> str:
    """The console script pyproject.toml installs for `app.cli:main`."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    names = [name for name, target in scripts.items() if target == "app.cli:main"]
    assert names, "pyproject.toml installs no script for app.cli:main"
    return str(names[0])


def tessera_args(argv: list[str]) -> list[str]:
    """The arguments after the `tessera` program in a command line (any path to it)."""
    assert argv, "empty command line"
    assert PurePosixPath(argv[0]).name == script_name(), f"{argv[0]} is not the tessera script"
    return argv[1:]


# --- the desktop entry ---------------------------------------------------------------------


def read_desktop_entry() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((PACKAGING / "tessera.desktop").read_text(encoding="utf-8"))
    assert parser.sections() == ["Desktop Entry"]
    return parser["Desktop Entry"]


def test_desktop_entry_has_the_required_keys() -> None:
    entry = read_desktop_entry()
    assert entry["Type"] == "Application"
    for key in ("Name", "Exec", "Icon", "Categories", "Comment"):
        assert entry.get(key, "").strip(), f"{key} is missing"
    assert entry.get("Terminal") == "false"
    categories = entry["Categories"]
    assert categories.endswith(";"), "a list value ends with ';'"
    assert {"Graphics", "3DGraphics"} <= set(filter(None, categories.split(";")))
    # The icon is named by theme name (no path, no extension) and exists in resources/.
    assert "/" not in entry["Icon"] and "." not in entry["Icon"]
    assert (ICONS / f"{entry['Icon']}.svg").is_file()


def test_desktop_entry_exec_opens_the_app() -> None:
    entry = read_desktop_entry()
    argv = shlex.split(entry["Exec"])
    # %f: the .blend the app was opened with (none when started from the menu).
    assert [arg for arg in argv if arg.startswith("%")] == ["%f"]
    assert entry["MimeType"] == "application/x-blender;"
    without_file = [arg for arg in argv if arg != "%f"]
    assert handler_name(parse_cli(tessera_args(without_file))) == "cmd_app"
    with_file = parse_cli(tessera_args([arg.replace("%f", "shot.blend") for arg in argv]))
    assert handler_name(with_file) == "cmd_app" and str(with_file.scene) == "shot.blend"
    assert entry["TryExec"] == script_name()


# --- systemd units ---------------------------------------------------------------------------

Unit = dict[str, dict[str, list[str]]]


def read_unit(name: str) -> Unit:
    """A unit file as section -> key -> every value (keys may repeat, e.g. DeviceAllow)."""
    text = (SYSTEMD / name).read_text(encoding="utf-8")
    # configparser reads it too (strict=False: repeated keys), as a sanity check.
    loose = configparser.ConfigParser(interpolation=None, strict=False)
    loose.optionxform = str  # type: ignore[assignment,method-assign]
    loose.read_string(text)
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical = re.sub(r"\\\n", " ", text)
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{name}: bad section line {line!r}"
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{name}: {line!r} is not KEY=VALUE"
        section.setdefault(key.strip(), []).append(value.strip())
    assert set(loose.sections()) == set(unit)
    return unit


def one(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit.get(section, {}).get(key, [])
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def specifiers(value: str) -> str:
    return value.replace("%h", FAKE_HOME).replace("%%", "%")


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            env[key.strip()] = value.strip()
    return env


def unit_environment(unit: Unit) -> dict[str, str]:
    """Environment= values, then the example of each EnvironmentFile= (same base name)."""
    env: dict[str, str] = {}
    for value in unit["Service"].get("Environment", []):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = val
    for value in unit["Service"].get("EnvironmentFile", []):
        example = SYSTEMD / (PurePosixPath(value.lstrip("-")).name + ".example")
        assert example.is_file(), f"no {example.name} documents {value}"
        env.update(read_env_file(example))
    return env


def exec_start_argv(unit: Unit) -> list[str]:
    """ExecStart= split and expanded as systemd does: $VAR becomes words, ${VAR} one."""
    line = specifiers(one(unit, "ExecStart")).lstrip("-@+!:")
    env = unit_environment(unit)
    argv: list[str] = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv += env.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


@pytest.mark.parametrize("name", SYSTEM_UNITS)
def test_system_units_are_hardened(name: str) -> None:
    unit = read_unit(name)
    service = unit["Service"]
    assert one(unit, "User") == "tessera"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "ProtectHome") in {"yes", "true", "read-only", "tmpfs"}
    assert one(unit, "PrivateTmp") == "yes"
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "CapabilityBoundingSet") == ""
    writable = [path for value in service["ReadWritePaths"] for path in value.split()]
    data = Path(str(parse_cli(tessera_args(exec_start_argv(unit))).data))
    assert any(data.is_relative_to(path) for path in writable), (
        f"--data {data} is not under ReadWritePaths={writable}"
    )
    assert one(unit, "WantedBy", "Install") == "multi-user.target"
    assert "network-online.target" in one(unit, "Wants", "Unit")


def test_node_unit_reads_the_coordinator_and_token_from_its_env_file() -> None:
    unit = read_unit("tessera-node.service")
    assert one(unit, "EnvironmentFile") == "/etc/tessera/node.env"
    env = read_env_file(SYSTEMD / "node.env.example")
    assert {"TESSERA_COORDINATOR", "TESSERA_TOKEN"} <= set(env)
    # GPUs must stay visible, and the user in the groups that own them.
    assert unit["Service"].get("PrivateDevices", ["no"])[-1] in {"no", "false"}
    assert {"video", "render"} <= set(one(unit, "SupplementaryGroups").split())


@pytest.mark.parametrize("name", NODE_UNITS)
def test_node_units_give_the_current_task_time_to_finish(name: str) -> None:
    unit = read_unit(name)
    assert one(unit, "KillSignal") == "SIGINT"
    # Only the node gets the signal; its Blender workers are stopped by the node.
    assert one(unit, "KillMode") == "mixed"
    grace = stop_grace()
    timeout = float(one(unit, "TimeoutStopSec").removesuffix("s"))
    assert timeout >= grace + STOP_MARGIN, f"TimeoutStopSec={timeout} leaves no time after {grace}"
    assert one(unit, "Restart") == "on-failure"


@pytest.mark.parametrize("name", ALL_UNITS)
def test_unit_exec_start_parses_with_the_cli(name: str) -> None:
    argv = exec_start_argv(read_unit(name))
    assert PurePosixPath(argv[0]).is_absolute(), "systemd needs an absolute ExecStart path"
    args = parse_cli(tessera_args(argv))
    assert handler_name(args) == UNIT_COMMANDS[name]


@pytest.mark.parametrize("example", ["node.env.example", "coordinator.env.example"])
def test_env_files_only_set_variables_tessera_reads(example: str) -> None:
    fields = {f"TESSERA_{name.upper()}" for name in Settings.model_fields}
    for key in read_env_file(SYSTEMD / example):
        if key.startswith("TESSERA_"):
            assert key in fields | NON_SETTINGS_VARIABLES, f"{example}: nothing reads {key}"
    farm_secret = "TESSERA_FARM_SECRET"
    assert farm_secret in (REPO / "app" / "cli" / "farm.py").read_text(), (
        "the CLI no longer reads it"
    )


def test_sysusers_creates_the_service_user() -> None:
    lines = (SYSTEMD / "tessera.sysusers.conf").read_text().splitlines()
    entries = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    assert ["u", "tessera"] in [entry[:2] for entry in entries]
    assert {"video", "render"} <= {entry[2] for entry in entries if entry[:2] == ["m", "tessera"]}


# --- the container ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CONTAINER / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in logical.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_values(keyword: str) -> list[str]:
    return [rest for key, rest in dockerfile_instructions() if key == keyword]


def exec_form(keyword: str) -> list[str]:
    values = dockerfile_values(keyword)
    assert len(values) == 1, f"one {keyword} expected"
    parsed = json.loads(values[0])  # the exec form: signals reach tessera, not a shell
    assert isinstance(parsed, list) and all(isinstance(word, str) for word in parsed)
    return parsed


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for value in dockerfile_values("ENV"):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = val
    return env


def test_dockerfile_entrypoint_and_cmd_parse_with_the_cli() -> None:
    entrypoint, cmd = exec_form("ENTRYPOINT"), exec_form("CMD")
    assert entrypoint[:2] == [script_name(), "node"]
    args = parse_cli(tessera_args(entrypoint + cmd))
    assert handler_name(args) == "cmd_node"
    # The default --data is the one the node would pick from TESSERA_HOME anyway, so
    # replacing CMD with other options keeps the data in the volume.
    assert Path(str(args.data)) == Path(dockerfile_env()["TESSERA_HOME"]) / "node"


def test_dockerfile_runs_a_gpu_node_as_a_user_with_a_data_volume() -> None:
    assert dockerfile_values("FROM")[0].startswith("nvidia/cuda:")
    users = dockerfile_values("USER")
    assert users and users[-1] not in {"root", "0"}
    env = dockerfile_env()
    volumes = [path for value in dockerfile_values("VOLUME") for path in json.loads(value)]
    assert env["TESSERA_HOME"] in volumes
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    assert "graphics" in env["NVIDIA_DRIVER_CAPABILITIES"].split(","), "OptiX needs it"
    assert env["TESSERA_DEVICE"].upper() in {"GPU", "OPTIX", "CUDA"}
    assert dockerfile_values("STOPSIGNAL") == ["SIGINT"]
    runs = " ".join(dockerfile_values("RUN"))
    assert "python3.11" in runs
    assert re.search(r"pip install [^&]*\[blender\]", runs), "bpy comes from the blender extra"


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    sources = []
    for value in dockerfile_values("COPY"):
        words = [word for word in shlex.split(value) if not word.startswith("--")]
        sources += words[:-1]
    assert sources
    ignore = (CONTAINER / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the ignore file starts from nothing"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        assert source.rstrip("/") in included, f"COPY {source} is excluded from the context"
    # Every package the wheel is built from is copied.
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in packages["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in sources, f"{pattern} is not copied into the image"


def test_compose_commands_parse_with_the_cli() -> None:
    yaml = pytest.importorskip("yaml")
    compose: dict[str, Any] = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    entrypoint = exec_form("ENTRYPOINT")
    expected = {"coordinator": "cmd_coordinator", "node": "cmd_node"}
    for name, service in compose["services"].items():
        argv = list(service.get("entrypoint", entrypoint)) + list(service.get("command", []))
        assert handler_name(parse_cli(tessera_args(argv))) == expected[name]
        assert service["stop_signal"] == "SIGINT"
    node = compose["services"]["node"]
    grace = float(node["stop_grace_period"].removesuffix("s"))
    assert grace >= stop_grace() + STOP_MARGIN
    devices = node["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" for device in devices)


# --- the PyInstaller spec and its launcher ---------------------------------------------------


def spec_constants() -> dict[str, Any]:
    """The spec's module-level constants (ENTRY, DATA_FILES, EXCLUDES...), never run."""
    text = (PACKAGING / "tessera.spec").read_text(encoding="utf-8")
    compile(text, "tessera.spec", "exec")  # a syntax error fails here
    constants: dict[str, Any] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id.isupper():
                try:
                    constants[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return constants


def test_spec_compiles_and_names_files_that_exist() -> None:
    constants = spec_constants()
    assert (REPO / constants["ENTRY"]).is_file()
    for source, target in constants["DATA_FILES"]:
        assert (REPO / source).is_file(), f"the spec bundles {source}, which does not exist"
        assert PurePosixPath(source).parent == PurePosixPath(target), (
            f"{source} must keep its package path in the bundle, not {target}"
        )
    for package in constants["PACKAGES"]:
        assert (REPO / package / "__init__.py").is_file()


def test_spec_bundles_the_scripts_blender_runs_and_not_bpy() -> None:
    constants = spec_constants()
    bundled = {source for source, _ in constants["DATA_FILES"]}
    for script in (WORKER_SCRIPT, DEMO_SCRIPT):
        assert script.relative_to(REPO).as_posix() in bundled
        module = ".".join(script.relative_to(REPO).with_suffix("").parts)
        assert module in constants["BLENDER_SCRIPTS"], f"{module} would be analysed (bpy)"
    assert "bpy" in constants["EXCLUDES"]
    assert {f"resources/icons/tessera-{size}.png" for size in ICON_SIZES} <= bundled


def load_launcher() -> Any:
    spec = importlib.util.spec_from_file_location("tessera_launcher", PACKAGING / "launcher.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_opens_the_app_without_arguments() -> None:
    launcher = load_launcher()
    assert handler_name(parse_cli(launcher.launch_args([], frozen=True))) == "cmd_app"
    assert handler_name(parse_cli(launcher.launch_args([], frozen=False))) == "cmd_app"
    node = launcher.launch_args(["node", "--token", "t"], frozen=True)
    assert handler_name(parse_cli(node)) == "cmd_node"
    # The local farm re-runs `sys.executable -m app.cli ARGS`: frozen, that is this program.
    spawned = launcher.launch_args(["-m", "app.cli", "coordinator", "--port", "0"], frozen=True)
    assert spawned == ["coordinator", "--port", "0"]
    local_farm = (REPO / "app" / "local_farm.py").read_text()
    assert '[sys.executable, "-m", "app.cli"' in local_farm, "update launcher.MODULE_PREFIX"


# --- icons -----------------------------------------------------------------------------------


def test_svg_icon_is_well_formed_and_self_contained() -> None:
    root = ET.parse(ICONS / "tessera.svg").getroot()
    assert root.tag == f"{SVG_NS}svg"
    view_box = [float(v) for v in root.attrib["viewBox"].split()]
    assert len(view_box) == 4 and view_box[2] == view_box[3] > 0, "a square icon"
    for element in root.iter():
        for name, value in element.attrib.items():
            if name.endswith("href"):
                assert value.startswith("#"), f"external reference {value}"


@pytest.mark.parametrize("size", ICON_SIZES)
def test_png_icons_are_pngs_of_their_size(size: int) -> None:
    data = (ICONS / f"tessera-{size}.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert (length, chunk) == (13, b"IHDR")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (width, height) == (size, size)
    assert depth == 8 and colour == 6, "8-bit RGBA (transparent corners)"


# --- the deployment guide -------------------------------------------------------------------


def guide_commands() -> list[list[str]]:
    """Every `tessera ...` command line in docs/deployment.md's sh blocks."""
    text = (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)  # VAR=value before the command
            if words and PurePosixPath(words[0]).name == script_name():
                commands.append(words)
    return commands


def test_deployment_guide_commands_parse_with_the_cli() -> None:
    commands = guide_commands()
    assert len(commands) >= 8, "the guide's examples were not found"
    seen = {handler_name(parse_cli(tessera_args(argv))) for argv in commands}
    assert {"cmd_coordinator", "cmd_node", "cmd_grant", "cmd_ledger", "cmd_devices"} <= seen
