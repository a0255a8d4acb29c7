#!/usr/bin/env python3
"""Interop with Confluent's own Python client (confluent-kafka[avro]).

Used by tests/avro.rs to prove baton speaks the same wire format as the
reference serializers, not just its own dialect of it:

  produce  reads events as JSON lines on stdin, serialises each with
           AvroSerializer (registering the schema, TopicNameStrategy) and
           produces it keyed by context_id;
  consume  reads Avro records from topics with AvroDeserializer and prints
           one JSON line per record: {"topic", "key", "value"}.
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def produce(args):
    registry = SchemaRegistryClient({"url": args.registry})
    with open(args.schema, encoding="utf-8") as schema_file:
        schema = schema_file.read()
    serializer = AvroSerializer(registry, schema, conf={"auto.register.schemas": True})
    producer = Producer({"bootstrap.servers": args.bootstrap, "enable.idempotence": True})
    count = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        event = json.loads(line)
        value = serializer(event, SerializationContext(args.topic, MessageField.VALUE))
        producer.produce(args.topic, key=event["context_id"].encode(), value=value)
        producer.poll(0)
        count += 1
    remaining = producer.flush(30)
    if remaining:
        raise SystemExit(f"{remaining} records not delivered")
    print(json.dumps({"produced": count}))


def plain(value):
    """datetime (timestamp-millis) back to epoch millis, recursively."""
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def consume(args):
    registry = SchemaRegistryClient({"url": args.registry})
    deserializer = AvroDeserializer(registry)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"interop-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe(args.topics.split(","))
    seen = 0
    deadline = time.monotonic() + args.timeout
    try:
        while seen < args.expect and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                raise KafkaException(message.error())
            value = deserializer(
                message.value(), SerializationContext(message.topic(), MessageField.VALUE)
            )
            key = message.key().decode() if message.key() is not None else None
            print(json.dumps({"topic": message.topic(), "key": key, "value": plain(value)}))
            seen += 1
    finally:
        consumer.close()
    if seen < args.expect:
        raise SystemExit(f"read {seen} of {args.expect} records before the timeout")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--schema", required=True)
    c = sub.add_parser("consume")
    c.add_argument("--bootstrap", required=True)
    c.add_argument("--registry", required=True)
    c.add_argument("--topics", required=True)
    c.add_argument("--expect", type=int, required=True)
    c.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    {"produce": produce, "consume": consume}[args.command](args)


if __name__ == "__main__":
    main()
