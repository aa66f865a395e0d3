"""Event numbers a client can resume after on any replica, or after a restart.

Two real `EventBus`es wired to each other as `coordinator.engines.notify.PeerRelay`
wires replicas (here in one process: the relay's transport is tested with PostgreSQL in
tests/test_replicas.py). A client following replica A resumes on replica B, or on a
coordinator restarted with an empty bus, with the last number A gave it: it gets what
happened since, at once, and nothing from before.
"""

from __future__ import annotations

from typing import Any

from coordinator.events import EventBus


def _link(a: EventBus, b: EventBus) -> None:
    def to(bus: EventBus) -> Any:
        return lambda kind, fields: bus.on_peer(kind, dict(fields))

    a.peers, b.peers = to(b), to(a)


def test_a_client_resumes_on_another_replica_after_the_number_the_first_gave_it() -> None:
    a = EventBus()
    for frame in range(1, 4):
        a.publish("frame", job_id="j", frame=frame, status="done")
    b = EventBus()  # a replica started later: it has not seen A's first events
    _link(a, b)
    a.publish("frame", job_id="j", frame=3, status="done")  # seen by both
    resumed_after = a.last_seq  # the client saw frames 1-3 on replica A, then A died
    b.publish("frame", job_id="j", frame=4, status="done")
    a.publish("frame", job_id="j", frame=5, status="done")  # relayed to B
    frames = [e.frame for e in b.since(resumed_after, "j")]
    assert frames[-2:] == [4, 5], frames
    assert not {1, 2} & set(frames), "events from before the resume point are not replayed"
    # Both replicas number every event they hold in rising order.
    for bus in (a, b):
        numbers = [e.seq for e in bus.since(0)]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_a_restarted_coordinator_goes_on_after_the_number_of_its_previous_life() -> None:
    before = EventBus()
    for frame in range(1, 50):
        before.publish("task", job_id="j", frame=frame, status="active")
    resumed_after = before.last_seq
    after_restart = EventBus()  # in memory only: a restart starts empty
    after_restart.publish("frame", job_id="j", frame=50, status="done")
    assert [e.frame for e in after_restart.since(resumed_after, "j")] == [50]
