"""A node renders strangers' scenes in bubblewrap by default: without a working
bubblewrap it serves only a coordinator on this machine, unless `--sandbox off` says
otherwise (issue 14). The refusal runs in a real process whose PATH has no bwrap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from farm_node.config import loopback_url, sandbox_refusal
from renderers.sandbox import find_bwrap
from tests.farm_tools import REPO

REMOTE = "https://farm.example.org:8400"


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8400", True),
        ("http://127.3.4.5", True),
        ("http://localhost:1", True),
        ("http://[::1]:8400", True),
        (REMOTE, False),
        ("http://10.0.0.2:8400", False),
        ("http://localhost.example.org", False),
    ],
)
def test_loopback_urls(url: str, loopback: bool) -> None:
    assert loopback_url(url) is loopback


def test_the_refusal_rule() -> None:
    assert sandbox_refusal(REMOTE, "auto", sandbox_works=True) is None
    assert sandbox_refusal("http://127.0.0.1:8400", "auto", sandbox_works=False) is None
    assert sandbox_refusal(REMOTE, "off", sandbox_works=False) is None
    refusal = sandbox_refusal(REMOTE, "auto", sandbox_works=False)
    assert refusal is not None and REMOTE in refusal and "bubblewrap" in refusal


_CHECK = """
import sys
from pathlib import Path
from farm_node.config import NodeConfig
from farm_node.main import _check_sandbox
from renderers.limits import RenderLimits
config = NodeConfig(coordinator_url=sys.argv[1], token="t", name="n", data_dir=Path("."),
                    limits=RenderLimits(sandbox=sys.argv[2]))
_check_sandbox(config)
print("allowed")
"""


def _check(url: str, mode: str, path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    return subprocess.run(
        [sys.executable, "-c", _CHECK, url, mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_bubblewrap_a_remote_farm_is_refused_unless_sandbox_off() -> None:
    refused = _check(REMOTE, "auto", "/nonexistent")
    assert refused.returncode != 0
    assert "No render sandbox" in refused.stderr and "--sandbox off" in refused.stderr
    assert "allowed" in _check(REMOTE, "off", "/nonexistent").stdout
    assert "allowed" in _check("http://127.0.0.1:8400", "auto", "/nonexistent").stdout


def test_with_bubblewrap_a_remote_farm_is_served_in_the_sandbox() -> None:
    if find_bwrap() is None:
        pytest.fail("bubblewrap is not usable here: `make test` installs it (apt)")
    assert "allowed" in _check(REMOTE, "auto", os.environ["PATH"]).stdout
