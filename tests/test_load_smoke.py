"""The load test's harness (benchmarks/bench_load.py, `make load`) on a small scale, so
that it cannot rot: a few simulated nodes against a real coordinator process, then the
same against one with tiny limits. No timing is asserted; only that the harness works
and that the coordinator answers overload with 503 + Retry-After and survives it."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_load import OK_STATUSES, Tally, run_phase


def _answers(tally: Tally) -> dict[str, int]:
    return {key: count for key, count in tally.statuses.items() if key.split()[1] != "200"}


def test_simulated_nodes_render_and_the_ledger_balances(tmp_path: Path) -> None:
    result = run_phase("smoke", tmp_path, nodes=20, window=3.0, render=(0.2, 0.5))
    tally: Tally = result["tally"]
    assert result["registered"] == 20
    assert tally.uploads > 0 and result["tasks_done"] >= tally.uploads
    assert set(tally.latencies) >= {"lease", "upload"}
    assert all(key.split()[1] in OK_STATUSES for key in tally.statuses), _answers(tally)
    assert result["alive"] and result["ledger_ok"]
    assert result["peak_rss_mib"] > 0


def test_overload_is_refused_with_retry_after_and_survived(tmp_path: Path) -> None:
    result = run_phase(
        "smoke-overload",
        tmp_path,
        nodes=30,
        window=3.0,
        render=(0.1, 0.3),
        max_concurrent=2,
        max_waiting=3,
    )
    tally: Tally = result["tally"]
    assert tally.overloaded > 0, _answers(tally)
    assert tally.without_retry_after == 0
    assert all(key.split()[1] in OK_STATUSES for key in tally.statuses), _answers(tally)
    assert tally.recoveries, "no refused node ever got an answer afterwards"
    assert result["alive"] and result["health"] == "ok" and result["ledger_ok"]
