"""Which farm a client talks to: the one place that resolves the coordinator URL and the
access token, for the CLI and the desktop app alike (no Qt, no argparse here).

The order of precedence: what the user passed (--coordinator/--token, or the fields of
the app's Settings page), then what the app saved, then `common.settings.Settings`
(TESSERA_COORDINATOR and TESSERA_TOKEN from the environment, else the local default
coordinator and the token file `$TESSERA_HOME/token` that `tessera join` writes).
Nothing is read at import and nothing connects: `FarmConnection.client()` only opens a
`TesseraClient`.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import TesseraError, UsageError
from common.settings import DEFAULT_COORDINATOR, Settings
from protocol.client import TesseraClient, split_urls

#: A CLI or a page refresh answers fast: three tries over 1.5 s, not the client's
#: default five over 7.5 s.
CLI_RETRIES = 2
#: A page refresh should fail fast and say so, not hang on a dead coordinator.
APP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class FarmConnection:
    """A coordinator and the token to use with it (None: not known yet)."""

    url: str
    token: str | None

    def client(self, *, timeout: float = APP_TIMEOUT) -> TesseraClient:
        """A new client; open one per piece of work (a session is not shared between
        threads) and close it after use."""
        return TesseraClient(self.url, self.token, timeout=timeout, retries=CLI_RETRIES)

    def require_token(self, settings: Settings) -> FarmConnection:
        """This connection, with a token; `UsageError` saying how to give one if none is
        known (or the token file cannot be read)."""
        if self.token:
            return self
        token = settings.resolved_token()
        if token:
            return FarmConnection(self.url, token)
        raise UsageError(
            f"No access token for the coordinator at {self.url}.",
            hint=f"Pass --token TOKEN or set TESSERA_TOKEN=TOKEN (or write it to "
            f"{settings.token_file}); the farm's admin creates tokens.",
        )


def coordinator_url(url: str | None, settings: Settings) -> str:
    """`url`, else the settings' coordinator (TESSERA_COORDINATOR), else the local
    default; `UsageError` for one without an http(s) scheme. Several replicas of one
    farm are given as "URL1,URL2" (the client fails over between them)."""
    chosen = str(url or settings.coordinator or DEFAULT_COORDINATOR)
    urls = split_urls(chosen)
    for part in urls or [chosen]:
        if not part.startswith(("http://", "https://")):
            raise UsageError(
                f"{part!r} is not a coordinator URL.",
                hint=f"Write it with its scheme, e.g. {DEFAULT_COORDINATOR} (several"
                " replicas of one farm: URL1,URL2).",
            )
    return ",".join(urls)


def resolve_connection(
    settings: Settings,
    *,
    url: str | None = None,
    token: str | None = None,
    saved: FarmConnection | None = None,
) -> FarmConnection:
    """The farm to talk to: `url`/`token` as given, else the `saved` choice (its token
    only for its own URL), else the settings' coordinator and token. The token may stay
    None (the app asks for one); `FarmConnection.require_token` insists on one."""
    if url is None and saved is not None:
        chosen, token = saved.url.rstrip("/"), token or saved.token
    else:
        chosen = coordinator_url(url, settings)
        if token is None and saved is not None and saved.url.rstrip("/") == chosen:
            token = saved.token
    if not token:
        try:
            token = settings.resolved_token()
        except TesseraError:
            token = None  # an unreadable token file: require_token says so when it matters
    return FarmConnection(chosen, token or None)
