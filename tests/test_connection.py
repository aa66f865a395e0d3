"""app.connection: the one rule for which coordinator and token the CLI and the app use."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.connection import FarmConnection, resolve_connection
from common.errors import UsageError
from common.settings import DEFAULT_COORDINATOR, Settings


def test_defaults_without_anything_set(isolated_settings: Path) -> None:
    connection = resolve_connection(Settings())
    assert connection == FarmConnection(DEFAULT_COORDINATOR, None)
    with pytest.raises(UsageError, match="No access token"):
        connection.require_token(Settings())


def test_environment_then_token_file(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated_settings / "token").write_text("from-file\n")
    monkeypatch.setenv("TESSERA_COORDINATOR", "http://farm:8400/")
    assert resolve_connection(Settings()) == FarmConnection("http://farm:8400", "from-file")
    monkeypatch.setenv("TESSERA_TOKEN", "from-env")
    assert resolve_connection(Settings()).token == "from-env"


def test_options_win_over_saved_and_environment(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TESSERA_TOKEN", "from-env")
    saved = FarmConnection("http://saved:8400", "saved-token")
    assert resolve_connection(Settings(), saved=saved) == saved
    given = resolve_connection(Settings(), url="http://given:1", token="t", saved=saved)
    assert given == FarmConnection("http://given:1", "t")
    # The saved token goes only with its own URL; another URL falls back to the settings'.
    other = resolve_connection(Settings(), url="http://given:1", saved=saved)
    assert other == FarmConnection("http://given:1", "from-env")
    same = resolve_connection(Settings(), url="http://saved:8400/", saved=saved)
    assert same.token == "saved-token"


def test_a_url_without_scheme_is_a_usage_error(isolated_settings: Path) -> None:
    with pytest.raises(UsageError, match="not a coordinator URL"):
        resolve_connection(Settings(), url="farm:8400")
