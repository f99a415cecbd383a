"""One trace id from a producer span, through RabbitMQ, into the worker's consumer span."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from contracts.topology import EXCHANGE, SIGN_QUEUE, declare_topology
from contracts.tracing import producer_span
from tests.support.fleet import RunningFleet
from tests.support.spans import by_name
from workers.observability.stages import Stage
from workers.observability.telemetry import consumer_span, stage

pytestmark = pytest.mark.rabbitmq


async def test_the_worker_span_continues_the_producer_trace_across_the_broker(
    empty_amqp_url: str, spans: InMemorySpanExporter
) -> None:
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel)
        processed = asyncio.Event()

        async def worker(message: AbstractIncomingMessage) -> None:
            with consumer_span(message, queue=SIGN_QUEUE), stage(Stage.SIGN):
                await message.ack()
            processed.set()

        await topology.queues[SIGN_QUEUE].consume(worker)
        with producer_span(
            exchange=EXCHANGE, routing_key="sign", message_id="req-9", correlation_id="c-9"
        ) as headers:
            await topology.exchange.publish(
                aio_pika.Message(b"{}", headers=headers, message_id="req-9", correlation_id="c-9"),
                routing_key="sign",
            )
        await asyncio.wait_for(processed.wait(), 30)

    finished = spans.get_finished_spans()
    producer = by_name(finished, "publish zandd:sign")
    consumer = by_name(finished, "process zandd:sign:zandd.sign")
    signing = by_name(finished, "zandd.sign")
    assert producer.context is not None
    assert consumer.context is not None
    assert producer.context.trace_id == consumer.context.trace_id
    assert signing.context is not None
    assert signing.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    attributes = consumer.attributes or {}
    assert attributes["messaging.message.id"] == "req-9"
    assert attributes["messaging.rabbitmq.destination.routing_key"] == "sign"
    assert isinstance(attributes["messaging.rabbitmq.message.delivery_tag"], int)


@pytest.mark.tpm
async def test_a_client_call_and_the_signers_work_share_one_trace(
    fleet: RunningFleet, spans: InMemorySpanExporter
) -> None:
    async with await fleet.client() as client:
        key = await client.create_key()
        spans.clear()
        await client.sign(key.key_id, b"traced")
    finished = spans.get_finished_spans()
    producer = by_name(finished, "publish zandd:sign")
    consumer = by_name(finished, "process zandd:sign:zandd.sign")
    assert producer.context is not None
    assert consumer.context is not None
    trace_id = producer.context.trace_id
    assert consumer.context.trace_id == trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    for name in ("zandd.vault_fetch", "zandd.unseal", "zandd.sign"):
        child = by_name(finished, name)
        assert child.context is not None
        assert child.context.trace_id == trace_id
        assert child.parent is not None
        assert child.parent.span_id == consumer.context.span_id
