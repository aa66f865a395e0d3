"""`tessera node --coordinator-file/--token-file`: read once written, waited for, and every
kind of bad file refused with the file named. (A node started before its coordinator and
registering once the files appear is what every `tessera render` does:
tests/test_render_overhead.py, tests/test_farm_e2e.py.)"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from farm_node.config import NodeConfig
from farm_node.connection_files import ConnectionFileError, read_connection_files


def _config(tmp_path: Path, **fields: object) -> NodeConfig:
    fields.setdefault("coordinator_url", "")
    return NodeConfig(data_dir=tmp_path / "node", **fields)  # type: ignore[arg-type]


def test_files_written_later_are_waited_for_and_read(tmp_path: Path) -> None:
    url_file, token_file = tmp_path / "coordinator.url", tmp_path / "node.token"
    config = _config(tmp_path, coordinator_file=url_file, token_file=token_file)
    config.validate()  # no URL yet is fine: the file will say it

    def write_later() -> None:
        time.sleep(0.3)
        url_file.write_text("http://127.0.0.1:8400\n")
        token_file.write_text("a-token\n")
        token_file.chmod(0o600)

    writer = threading.Thread(target=write_later)
    started = time.monotonic()
    writer.start()
    read = read_connection_files(config, timeout=10)
    writer.join()
    assert time.monotonic() - started >= 0.3
    assert (read.coordinator_url, read.token) == ("http://127.0.0.1:8400", "a-token")
    read.validate()


def test_a_token_written_by_hand_without_a_newline_counts_once_it_settles(tmp_path: Path) -> None:
    token_file = tmp_path / "node.token"
    token_file.write_text("by-hand")
    config = _config(tmp_path, coordinator_url="http://127.0.0.1:1", token_file=token_file)
    assert read_connection_files(config, timeout=5).token == "by-hand"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("", "the file is empty"),
        ("\n\n", "the file is empty"),
    ],
)
def test_a_file_that_never_holds_the_value_is_a_clear_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    token_file = tmp_path / "node.token"
    if content is not None:
        token_file.write_text(content)
    config = _config(tmp_path, coordinator_url="http://127.0.0.1:1", token_file=token_file)
    with pytest.raises(ConnectionFileError, match=message) as error:
        read_connection_files(config, timeout=0.3)
    assert str(token_file) in error.value.message and error.value.hint


def test_two_lines_and_an_unreadable_file_are_refused(tmp_path: Path) -> None:
    url_file = tmp_path / "coordinator.url"
    url_file.write_text("http://a:1\nhttp://b:2\n")
    with pytest.raises(ConnectionFileError, match="2 lines"):
        read_connection_files(_config(tmp_path, coordinator_file=url_file), timeout=1)
    url_file.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ConnectionFileError, match="Cannot read"):
        read_connection_files(_config(tmp_path, coordinator_file=url_file), timeout=1)


def test_a_url_file_that_is_no_url_fails_validation(tmp_path: Path) -> None:
    url_file = tmp_path / "coordinator.url"
    url_file.write_text("ftp://nope\n")
    read = read_connection_files(_config(tmp_path, coordinator_file=url_file), timeout=1)
    with pytest.raises(Exception, match="not http"):
        read.validate()


def test_a_token_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "node.token"
    token_file.write_text("t\n")
    token_file.chmod(0o644)
    config = _config(tmp_path, coordinator_url="http://127.0.0.1:1", token_file=token_file)
    with caplog.at_level(logging.WARNING):
        read_connection_files(config, timeout=1)
    assert "chmod 600" in caplog.text
