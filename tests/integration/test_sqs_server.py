"""The local SQS server the SQS tests run against: it starts on a free port, answers, and the
behaviours of moto that the SQS tests rely on (docs/brokers.md lists where it differs)."""

from __future__ import annotations

import pytest

from tests import brokers

pytestmark = [pytest.mark.integration, pytest.mark.sqs]


def test_the_server_answers_and_keeps_queues_apart(sqs_server: brokers.MotoServer) -> None:
    client = sqs_server.client()
    first = sqs_server.create_queue(brokers.unique_name("server"))
    second = sqs_server.create_queue(brokers.unique_name("server"))
    client.send_message(QueueUrl=first, MessageBody="hello")
    got = client.receive_message(QueueUrl=first, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    assert [m["Body"] for m in got["Messages"]] == ["hello"]
    assert "Messages" not in client.receive_message(QueueUrl=second, MaxNumberOfMessages=10)
    assert sqs_server.endpoint_url.startswith("http://127.0.0.1:")


def test_a_server_that_cannot_start_is_an_error(sqs_server: brokers.MotoServer) -> None:
    # The port is taken by the running server: a second one cannot listen there.
    other = brokers.MotoServer(port=sqs_server.port, startup_timeout_s=10)
    try:
        with pytest.raises(brokers.BrokerError):
            other.start()
    finally:
        other.close()
    assert sqs_server.running
