"""Test helpers for verification: several provider nodes of different accounts, some of
which cheat, served round-robin from one test thread against a real coordinator.

Each `VirtualNode` registers like a real node and renders its leases with a real
Blender worker; a cheating one fakes its work with the real node's `farm_node.cheats`.
Serving them in turn (rather than in threads) keeps the tests deterministic enough to
assert on, while the coordinator still sees separate accounts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ApiError
from farm_node.cheats import Cheat, CheatMode
from protocol.client import TesseraClient
from protocol.models import Heartbeat, LeaseRequest, NodeCapabilities, Role
from renderers.worker import RenderWorker
from tests.farm_tools import do_lease


@dataclass
class VirtualNode:
    name: str
    client: TesseraClient
    worker: RenderWorker
    capabilities: NodeCapabilities
    cheat: Cheat | None = None
    node_id: str = ""
    #: Ids of the tasks this node faked.
    faked: list[str] = field(default_factory=list)
    done: int = 0
    refused: list[str] = field(default_factory=list)
    #: Seconds it waits before each upload (a provider that stalls to look slow).
    delay: float = 0.0

    def register(self) -> None:
        self.node_id = self.client.register_node(self.capabilities).node_id

    def step(self, scene: Path, scratch: Path) -> bool:
        """Take and finish one task if one is offered; True if it did."""
        lease = self.client.lease(self.node_id, LeaseRequest(wait=0))
        if lease is None:
            return False
        output = scratch / f"{self.name}-{lease.lease_id}.exr"
        plan = self.cheat.plan(lease) if self.cheat is not None else None
        if plan is not None:
            lease = plan.lease
            if plan.fake is not None:
                self.faked.append(lease.task.id)
        do_lease(self.client, self.worker, scene, lease, output)
        if self.cheat is not None and plan is not None:
            self.cheat.finish(plan, output)
        self.client.heartbeat(lease.lease_id, Heartbeat(progress=1.0))
        time.sleep(self.delay)
        try:
            self.client.upload_result(lease.lease_id, output)
        except ApiError as exc:
            self.refused.append(exc.message)
        self.done += 1
        return True


def make_node(
    admin: TesseraClient,
    url: str,
    name: str,
    worker: RenderWorker,
    *,
    kernel: str = "AVX2",
    price: float = 1.0,
    cheat: str | None = None,
    seed: int | str | None = None,
    delay: float = 0.0,
    score: float | None = None,
) -> VirtualNode:
    """A node with its own provider account called `name`."""
    token = admin.create_account(name, Role.PROVIDER).token
    caps = NodeCapabilities(
        name=name,
        blender_versions=["5.0.1"],
        cpu="Test CPU",
        cpu_kernel=kernel,
        price=price,
        benchmark_score=score,
    )
    rng = random.Random(name if seed is None else seed)
    faker = Cheat(CheatMode(cheat), rng=rng) if cheat else None
    node = VirtualNode(name, TesseraClient(url, token), worker, caps, faker, delay=delay)
    node.register()
    return node


def serve(
    nodes: list[VirtualNode],
    scene: Path,
    scratch: Path,
    done: Callable[[], bool],
    timeout: float = 240.0,
) -> None:
    """Let every node take one task in turn until `done()` (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the farm did not finish in time")
        progressed = False
        for node in nodes:
            try:
                progressed |= node.step(scene, scratch)
            except ApiError as exc:  # a suspended node is refused: it stops serving
                if exc.status != 403:
                    raise
                node.refused.append(exc.message)
                nodes = [n for n in nodes if n is not node]
                break
        if not progressed:
            time.sleep(0.05)
