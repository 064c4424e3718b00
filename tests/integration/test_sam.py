"""SAM and CloudFormation templates run by `workers run TEMPLATE --overrides FILE` against the
real local brokers: every good record handled, the poison ones where the template says they go.

The shapes are those of public templates: an SQS queue with a redrive policy and a
self-managed Kafka event with an on-failure destination (examples/sam), an MQ (RabbitMQ)
event with BASIC_AUTH, an MSK event, and a plain CloudFormation
`AWS::Lambda::EventSourceMapping`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest

from tests import brokers

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sam"
POISON_ID = 7
ORDERS = [{"id": i, "amount": -5.0 if i == POISON_ID else 10.0 + i} for i in range(1, 13)]
GOOD = len(ORDERS) - 1

pytestmark = pytest.mark.integration


def bodies() -> list[str]:
    return [json.dumps(order) for order in ORDERS]


def run_template(
    folder: Path, environ: dict[str, str], template: str = "template.yaml"
) -> tuple[dict[str, Any], str]:
    """`workers run TEMPLATE --overrides overrides.yaml --until-idle` in `folder`: the summary
    by mapping, and the log."""
    summary = folder / "summary.json"
    command = [sys.executable, "-m", "workers", "run", template, "--overrides", "overrides.yaml"]
    done = subprocess.run(
        [*command, "--until-idle", "1", "--summary-json", str(summary)],
        cwd=folder,
        env={**os.environ, **environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    stats: dict[str, Any] = orjson.loads(summary.read_bytes())
    return stats, done.stderr


def receive_all(client: Any, queue_url: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while True:
        got = client.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
        ).get("Messages", [])
        if not got:
            return messages
        messages += got


@pytest.mark.kafka
@pytest.mark.sqs
def test_sam_example(
    kafka_broker: brokers.Tansu, sqs_server: brokers.MotoServer, tmp_path: Path
) -> None:
    """examples/sam, unchanged: orders from SQS (ReportBatchItemFailures, the poison message
    left to the queue's redrive policy) and payments from Kafka (the poison payment bisected,
    retried once, then in the PaymentsFailures queue)."""
    from workers.events import records

    client = sqs_server.client()
    dlq_url = sqs_server.create_queue(brokers.unique_name("orders-dlq"))
    dlq_arn = client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
    redrive = {"deadLetterTargetArn": dlq_arn["Attributes"]["QueueArn"], "maxReceiveCount": "3"}
    orders_url = sqs_server.create_queue(
        brokers.unique_name("orders"), RedrivePolicy=json.dumps(redrive)
    )
    failures_url = sqs_server.create_queue(brokers.unique_name("payments-failures"))
    for body in bodies():
        client.send_message(QueueUrl=orders_url, MessageBody=body)
    topic = kafka_broker.create_topic(brokers.unique_name("payments"))
    brokers.produce(
        kafka_broker.bootstrap, topic, [brokers.KafkaRecord(value=b.encode()) for b in bodies()]
    )
    folder = shutil.copytree(EXAMPLE, tmp_path / "sam")

    stats, log = run_template(
        folder,
        {
            "KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "PAYMENTS_TOPIC": topic,
            "SQS_ENDPOINT": sqs_server.endpoint_url,
            "ORDERS_QUEUE_URL": orders_url,
            "PAYMENTS_FAILURES_URL": failures_url,
        },
    )

    orders, payments = stats["OrdersFunction-Orders"], stats["PaymentsFunction-Payments"]
    assert orders["succeeded"] == GOOD, orders
    assert payments["succeeded"] == GOOD, payments
    # The payment that fails: retried once (MaximumRetryAttempts), then a letter in the queue
    # the template's DestinationConfig names.
    assert payments["dead_lettered"] == 1, payments
    letters = [json.loads(m["Body"]) for m in receive_all(client, failures_url)]
    assert [letter["mapping"] for letter in letters] == ["PaymentsFunction-Payments"]
    assert [r.json()["id"] for r in records(letters[0]["payload"])] == [POISON_ID]
    assert letters[0]["error"]["errorType"] == "InvalidOrder"
    # The order that fails: reported by messageId, retried as the redrive policy allows.
    # SQS itself retries it and moves it to the dead-letter queue after maxReceiveCount.
    moved = [json.loads(m["Body"]) for m in receive_all(client, dlq_url)]
    assert [order["id"] for order in moved] == [POISON_ID]
    assert orders["dropped"] == 0, orders
    assert receive_all(client, orders_url) == []
    # What does not run here is said once at start-up.
    assert log.count("left alone: PaymentsFunction.Reconcile (Schedule)") == 1, log
    assert log.count("ignored, no meaning here: OrdersFunction: Architectures") == 1, log


MQ_AND_MSK = """\
    AWSTemplateFormatVersion: "2010-09-09"
    Transform: AWS::Serverless-2016-10-31
    Parameters:
      BrokerArn:
        Type: String
        Default: arn:aws:mq:us-east-1:123456789012:broker:shop:b-9f2c1e0a
      MqSecret: {Type: String, Default: "arn:aws:secretsmanager:us-east-1:123456789012:secret:mq"}
      Topic: {Type: String, Default: orders}
    Globals:
      Function: {Runtime: python3.12, CodeUri: src/, Timeout: 10}
    Resources:
      Cluster:
        Type: AWS::MSK::Cluster
        Properties:
          ClusterName: shop
          KafkaVersion: 3.6.0
          NumberOfBrokerNodes: 3
          BrokerNodeGroupInfo: {InstanceType: kafka.m5.large, ClientSubnets: [a, b, c]}
      QueueFunction:
        Type: AWS::Serverless::Function
        Properties:
          Handler: handlers.from_rabbitmq
          Events:
            Orders:
              Type: MQ
              Properties:
                Broker: !Ref BrokerArn
                Queues: [!Sub "${AWS::StackName}-orders"]
                BatchSize: 5
                SourceAccessConfigurations:
                  - {Type: BASIC_AUTH, URI: !Ref MqSecret}
                  - {Type: VIRTUAL_HOST, URI: /}
      StreamFunction:
        Type: AWS::Serverless::Function
        Properties:
          Handler: handlers.from_msk
          Events:
            Orders:
              Type: MSK
              Properties:
                Stream: !GetAtt Cluster.Arn
                Topics: [!Ref Topic]
                StartingPosition: TRIM_HORIZON
                BisectBatchOnFunctionError: true
                MaximumRetryAttempts: 0
                DestinationConfig:
                  OnFailure: {Destination: !Sub "kafka://${Topic}-failures"}
    """

HANDLERS = """\
    import base64
    import json


    def _check(order):
        if order["amount"] < 0:
            raise ValueError(f"order {order['id']}: negative amount")


    def from_rabbitmq(event, context):
        assert event["eventSource"] == "aws:rmq"
        for messages in event["rmqMessagesByQueue"].values():
            for message in messages:
                _check(json.loads(base64.b64decode(message["data"])))


    def from_msk(event, context):
        assert event["eventSource"] == "aws:kafka", event["eventSource"]
        arn = event["eventSourceArn"]
        assert arn.startswith("arn:aws:kafka:us-east-1:123456789012:cluster/shop/"), arn
        for records in event["records"].values():
            for record in records:
                _check(json.loads(base64.b64decode(record["value"])))
    """

MQ_AND_MSK_OVERRIDES = """\
    parameters: {AWS::StackName: "${STACK}", Topic: "${TOPIC}"}
    sources:
      BrokerArn: {url: "amqp://${MQ_USER}:${MQ_PASSWORD}@${MQ_HOST}/%2F"}
      Cluster:
        bootstrap_servers: "${KAFKA_BOOTSTRAP}"
        client_config: {session.timeout.ms: 2000, heartbeat.interval.ms: 500}
    """


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


@pytest.mark.kafka
@pytest.mark.rabbitmq
def test_mq_with_basic_auth_and_msk(
    kafka_broker: brokers.Tansu, rabbitmq_url: str, tmp_path: Path
) -> None:
    """An MQ event (RabbitMQ, BASIC_AUTH: the credentials come from ${VAR} in the overrides) and
    an MSK event (the cluster a template resource, its bootstrap servers from the overrides,
    the poison record bisected out to Lambda's `kafka://` topic destination)."""
    from urllib.parse import urlsplit

    from workers.events import records

    stack = brokers.unique_name("shop")
    queue = f"{stack}-orders"
    topic = kafka_broker.create_topic(brokers.unique_name("orders"))
    kafka_broker.create_topic(f"{topic}-failures")
    brokers.produce(
        kafka_broker.bootstrap, topic, [brokers.KafkaRecord(value=b.encode()) for b in bodies()]
    )
    url = urlsplit(rabbitmq_url)
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.confirm_delivery()
    try:
        for order in ORDERS:
            if order["id"] != POISON_ID:  # Lambda's MQ mappings retry a failure without end
                body = json.dumps(order).encode()
                channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
        folder = write(
            tmp_path,
            {
                "template.yaml": MQ_AND_MSK,
                "overrides.yaml": MQ_AND_MSK_OVERRIDES,
                "src/handlers.py": HANDLERS,
            },
        )
        stats, log = run_template(
            folder,
            {
                "STACK": stack,
                "MQ_USER": url.username or "guest",
                "MQ_PASSWORD": url.password or "guest",
                "MQ_HOST": f"{url.hostname}:{url.port or 5672}",
                "KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
                "TOPIC": topic,
            },
        )
    finally:
        channel.queue_delete(queue)
        connection.close()

    mq, msk = stats["QueueFunction-Orders"], stats["StreamFunction-Orders"]
    assert mq["succeeded"] == GOOD and mq["invoked"] == GOOD, mq
    assert msk["succeeded"] == GOOD and msk["dead_lettered"] == 1, msk
    letters = brokers.read_topic(kafka_broker.bootstrap, f"{topic}-failures")
    payloads = [json.loads(m.value() or b"") for m in letters]
    assert [letter["mapping"] for letter in payloads] == ["StreamFunction-Orders"]
    assert [r.json()["id"] for r in records(payloads[0]["payload"])] == [POISON_ID]
    assert f":{url.password or 'guest'}@" not in log


RAW_MAPPING: dict[str, Any] = {
    "AWSTemplateFormatVersion": "2010-09-09",
    "Parameters": {"QueueName": {"Type": "String"}},
    "Conditions": {"Enabled": {"Fn::Not": [{"Fn::Equals": [{"Ref": "QueueName"}, ""]}]}},
    "Resources": {
        "Queue": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": {"Ref": "QueueName"}}},
        "Role": {"Type": "AWS::IAM::Role", "Properties": {"AssumeRolePolicyDocument": {}}},
        "Worker": {
            "Type": "AWS::Lambda::Function",
            "Properties": {
                "Runtime": "python3.12",
                "Handler": "worker.handle",
                "Code": "./code",
                "Role": {"Fn::GetAtt": ["Role", "Arn"]},
                "Environment": {"Variables": {"QUEUE": {"Fn::GetAtt": ["Queue", "QueueName"]}}},
            },
        },
        "WorkerQueueMapping": {
            "Type": "AWS::Lambda::EventSourceMapping",
            "Properties": {
                "FunctionName": {"Ref": "Worker"},
                "EventSourceArn": {"Fn::GetAtt": ["Queue", "Arn"]},
                "BatchSize": 4,
                "Enabled": {"Fn::If": ["Enabled", True, False]},
                "FilterCriteria": {
                    "Filters": [
                        {"Pattern": json.dumps({"body": {"amount": [{"numeric": [">=", 0]}]}})}
                    ]
                },
            },
        },
    },
}


@pytest.mark.sqs
def test_raw_event_source_mapping(sqs_server: brokers.MotoServer, tmp_path: Path) -> None:
    """A plain CloudFormation template (JSON) with an `AWS::Lambda::EventSourceMapping`: the
    parameter without a default given in the overrides, FilterCriteria applied (the poison
    order filtered out, as Lambda deletes a filtered-out SQS message)."""
    client = sqs_server.client()
    name = brokers.unique_name("work")
    queue_url = sqs_server.create_queue(name)
    for body in bodies():
        client.send_message(QueueUrl=queue_url, MessageBody=body)
    folder = write(
        tmp_path,
        {
            "template.json": json.dumps(RAW_MAPPING, indent=2),
            "overrides.yaml": f"""\
                parameters: {{QueueName: {name}}}
                sources:
                  Queue: {{queue_url: "{queue_url}"}}
                """,
            "code/worker.py": """\
                import json
                import os


                def handle(event, context):
                    for record in event["Records"]:
                        assert record["eventSourceARN"].endswith(":" + os.environ["QUEUE"])
                        assert json.loads(record["body"])["amount"] >= 0
                """,
        },
    )

    stats, log = run_template(folder, {}, template="template.json")

    worker = stats["WorkerQueueMapping"]
    assert worker["succeeded"] == GOOD, worker
    assert worker["filtered_out"] == 1, worker
    assert receive_all(client, queue_url) == []
    assert "ignored, no meaning here: Worker: Role" in log
