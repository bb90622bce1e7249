"""Tests of swarm.discovery.mdns: real mDNS on 127.0.0.1.

Every mDNS test binds to 127.0.0.1 only and uses a swarm name of its own, so tests that
run at the same time on this machine (same service type, same port 5353) cannot see
each other's peers as theirs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from swarm import PROTOCOL_VERSION, config
from swarm.config import Timings
from swarm.discovery.mdns import Discovery
from swarm.discovery.table import PeerTable
from swarm.errors import ConfigError
from tests.swarm.announce import announcement, new_key, pid, service

LOOPBACK = ["127.0.0.1"]
WAIT_S = 10.0  # upper bound for mDNS to deliver; tests finish as soon as it does


# --- real mDNS on 127.0.0.1 -------------------------------------------------------------

FAST = Timings(mdns_resolve_timeout_s=2.0, mdns_register_timeout_s=10.0)
Factory = Callable[[str], Awaitable[Discovery]]


@pytest.fixture
def swarm_name() -> str:
    """A swarm name no other test (or concurrent test run) uses."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def discoveries() -> AsyncIterator[Factory]:
    """Start Discovery instances on 127.0.0.1 only; close them all afterwards."""
    async with AsyncExitStack() as stack:

        async def make(swarm: str) -> Discovery:
            disc = Discovery(PeerTable(swarm), interfaces=LOOPBACK, timings=FAST)
            return await stack.enter_async_context(disc)

        yield make


@pytest.fixture
async def raw_zeroconf() -> AsyncIterator[AsyncZeroconf]:
    """A bare AsyncZeroconf on 127.0.0.1, to announce records Announcement would refuse."""
    async with AsyncZeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only) as zc:
        yield zc


async def test_two_peers_see_each_other(discoveries: Factory, swarm_name: str) -> None:
    """Two Discovery instances on 127.0.0.1 register and find each other with every field."""
    a, b = await discoveries(swarm_name), await discoveries(swarm_name)
    ann_a = announcement(swarm_name, variant="T1", port=9001)
    ann_b = announcement(swarm_name, variant="T2", port=9002)
    await asyncio.gather(a.register(ann_a), b.register(ann_b))
    await a.table.wait_for(2, timeout=WAIT_S)
    await b.table.wait_for(2, timeout=WAIT_S)
    seen = b.table.get(ann_a.peer_id)
    assert seen is not None
    assert (seen.variant, seen.port, seen.addresses) == ("T1", 9001, ("127.0.0.1",))
    assert (seen.public_key, seen.model_sha256, seen.macs) == (
        ann_a.public_key,
        ann_a.model_sha256,
        ann_a.macs,
    )
    assert seen.accuracy == pytest.approx(ann_a.accuracy)
    assert a.table.variants() == {"T1", "T2"}


async def test_update_propagates_and_goodbye_removes(discoveries: Factory, swarm_name: str) -> None:
    """An update reaches the other peer; a closing peer's goodbye removes it there."""
    a, b = await discoveries(swarm_name), await discoveries(swarm_name)
    ann = announcement(swarm_name, variant="T1")
    await a.register(ann)
    await b.table.wait_for(lambda t: ann.peer_id in t, timeout=WAIT_S)

    await a.update(dataclasses.replace(ann, variant="T3", accuracy=0.93))

    def updated(table: PeerTable) -> bool:
        record = table.get(ann.peer_id)
        return record is not None and record.variant == "T3"

    await b.table.wait_for(updated, timeout=WAIT_S)
    await a.aclose()
    await b.table.wait_for(lambda t: ann.peer_id not in t, timeout=WAIT_S)
    await a.aclose()  # idempotent


async def test_other_swarm_and_version_are_ignored(discoveries: Factory, swarm_name: str) -> None:
    """Peers of another swarm or protocol version are seen on the wire but never tabled."""
    mine = await discoveries(swarm_name)
    other = await discoveries(swarm_name + "-x")
    future = await discoveries(swarm_name)
    foreign = announcement(swarm_name + "-x")
    newer = announcement(swarm_name, protocol=PROTOCOL_VERSION + 1)
    await asyncio.gather(other.register(foreign), future.register(newer))

    def both_ignored(table: PeerTable) -> bool:
        return table.ignored.get(service(foreign.peer_id)) == "other_swarm" and (
            table.ignored.get(service(newer.peer_id)) == "protocol_version"
        )

    await mine.table.wait_for(both_ignored, timeout=WAIT_S)
    assert len(mine.table) == 0


async def test_key_mismatch_is_ignored(
    discoveries: Factory, swarm_name: str, raw_zeroconf: AsyncZeroconf
) -> None:
    """A service whose peer id is not the hash of its key is ignored."""
    mine = await discoveries(swarm_name)
    ann = announcement(swarm_name)
    liar = pid(new_key())  # a real-looking id, of another key (and unique per run)
    props = {**ann.txt(), "id": liar}
    info = AsyncServiceInfo(
        config.SERVICE_TYPE,
        service(liar),
        addresses=[socket.inet_aton("127.0.0.1")],
        port=8080,
        properties=props,
        server="liar.local.",
    )
    await (await raw_zeroconf.async_register_service(info))
    await mine.table.wait_for(
        lambda t: t.ignored.get(service(liar)) == "peer_id_mismatch", timeout=WAIT_S
    )
    assert liar not in mine.table
    await (await raw_zeroconf.async_unregister_service(info))


async def test_discovery_argument_checks(discoveries: Factory, swarm_name: str) -> None:
    """Interfaces must be explicit IPv4 addresses; register/update misuse is a ConfigError."""
    table = PeerTable(swarm_name)
    for bad in ([], "127.0.0.1", ["localhost"], ["::1"]):
        with pytest.raises(ConfigError):
            Discovery(table, interfaces=bad)
    disc = await discoveries(swarm_name)
    with pytest.raises(ConfigError, match="swarm"):
        await disc.register(announcement("elsewhere"))
    with pytest.raises(ConfigError, match="register"):
        await disc.update(announcement(swarm_name))
    ann = announcement(swarm_name)
    await disc.register(ann)
    with pytest.raises(ConfigError, match="already registered"):
        await disc.register(ann)
    with pytest.raises(ConfigError, match="peer id"):
        await disc.update(announcement(swarm_name))


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) is not installed")
async def test_standard_dns_sd_client_resolves_service(
    discoveries: Factory, swarm_name: str
) -> None:
    """dig's unicast query to 127.0.0.1:5353 gets our PTR, SRV and TXT (RFC 6762 section 6.7)."""
    disc = await discoveries(swarm_name)
    ann = announcement(swarm_name, port=9123)
    await disc.register(ann)
    answer = ""
    # Every zeroconf socket on this host shares port 5353 (SO_REUSEPORT), and the kernel
    # hands a unicast query to one of them: retry so that ours gets one to answer.
    for _ in range(20):
        proc = await asyncio.create_subprocess_exec(
            *("dig", "+time=1", "+tries=1", "-p", "5353", "@127.0.0.1"),
            *("_vswarm._tcp.local", "PTR"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(5):
            out, _ = await proc.communicate()
        answer = out.decode()
        if ann.peer_id in answer:
            break
    assert re.search(rf"IN\s+PTR\s+{re.escape(service(ann.peer_id))}", answer)
    assert re.search(r"IN\s+SRV\s+0 0 9123 ", answer)
    assert f'"id={ann.peer_id}"' in answer
