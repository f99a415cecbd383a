"""``zandd topology``: declare the topology, and move the sign route to ``--sign-shards N``."""

from __future__ import annotations

import argparse
from contextlib import AsyncExitStack

from workers.commands.base import BROKER, CommandTree
from workers.service.config import Settings


async def _cmd_topology(args: argparse.Namespace, settings: Settings) -> int:
    from aio_pika.abc import AbstractChannel

    from contracts.amqp import connect_plain
    from contracts.topology import SIGN_HASH_EXCHANGE, SIGN_HASH_PROPERTY, declare_topology
    from workers.service.serve import node_urls

    nodes = node_urls(settings)
    async with AsyncExitStack() as stack:

        async def place(index: int) -> AbstractChannel:
            node = await connect_plain(nodes[index % len(nodes)], connection_name="zandd-topology")
            await stack.enter_async_context(node)
            return await node.channel()

        connection = await connect_plain(settings.amqp_url, connection_name="zandd-topology")
        await stack.enter_async_context(connection)
        channel = await connection.channel()
        topology = await declare_topology(channel, sign_shards=settings.sign_shards, place=place)
        counts = []
        for name in topology.sign_queues:
            declared = await channel.declare_queue(name, passive=True)
            counts.append(f"{name} ({declared.declaration_result.message_count or 0} waiting)")
    if settings.sign_shards == 1:
        print("sign requests: zandd -> zandd.sign")
    else:
        print(
            f"sign requests: zandd -> {SIGN_HASH_EXCHANGE} (hash of {SIGN_HASH_PROPERTY}) -> "
            f"zandd.sign.0 .. zandd.sign.{settings.sign_shards - 1}"
        )
    print("signers consume: " + ", ".join(counts))
    return 0


def register(tree: CommandTree) -> None:
    """Add the topology command."""
    tree.add(
        "topology",
        _cmd_topology,
        "declare the broker topology and route sign requests to --sign-shards queues (an "
        "administrator's URL; for workers run with ZANDD_DECLARE_TOPOLOGY=false)",
        settings=(*BROKER, "sign_shards"),
    )
