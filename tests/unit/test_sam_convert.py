"""SAM and CloudFormation templates as native configurations (`workers.app.sam`), on the shapes
of public templates: SQS with a redrive policy, self-managed Kafka with a destination, MSK, MQ
with BASIC_AUTH and a plain `AWS::Lambda::EventSourceMapping`; what does not run here; where
problems are said to be; `workers sam convert`'s output."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from workers.app.config import ConfigError
from workers.app.sam import convert, load_template

SQS_WITH_REDRIVE = """\
    AWSTemplateFormatVersion: '2010-09-09'
    Transform: AWS::Serverless-2016-10-31
    Description: SQS queue with a dead-letter queue feeding a function (partial batch responses)
    Globals:
      Function:
        Runtime: python3.12
        Timeout: 15
        Environment: {Variables: {TABLE: orders}}
    Resources:
      MyDeadLetterQueue:
        Type: AWS::SQS::Queue
      MySqsQueue:
        Type: AWS::SQS::Queue
        Properties:
          RedrivePolicy:
            deadLetterTargetArn: !GetAtt MyDeadLetterQueue.Arn
            maxReceiveCount: 5
      QueueConsumerFunction:
        Type: AWS::Serverless::Function
        Properties:
          CodeUri: src/
          Handler: app.lambda_handler
          Environment: {Variables: {QUEUE_URL: !Ref MySqsQueue}}
          Architectures: [arm64]
          Events:
            MySQSEvent:
              Type: SQS
              Properties:
                Queue: !GetAtt MySqsQueue.Arn
                BatchSize: 10
                MaximumBatchingWindowInSeconds: 2
                FunctionResponseTypes: [ReportBatchItemFailures]
                ScalingConfig: {MaximumConcurrency: 5}
                FilterCriteria:
                  Filters:
                    - Pattern: '{"body": {"kind": ["order"]}}'
            Everyday:
              Type: Schedule
              Properties: {Schedule: rate(1 day)}
    Outputs:
      QueueUrl: {Value: !Ref MySqsQueue}
    """
SQS_OVERRIDES = """\
    sources:
      MySqsQueue:
        queue_url: http://127.0.0.1:4566/123456789012/orders
        endpoint_url: http://127.0.0.1:4566
    functions:
      QueueConsumerFunction: {isolation: thread, environment: {EXTRA: "1"}}
    """


def write(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for code in ("src", "code"):
        (tmp_path / code).mkdir(exist_ok=True)
    return tmp_path


def converted(tmp_path: Path, template: str, overrides: str | None = None, **kw: Any) -> Any:
    files = {"template.yaml": template}
    if overrides is not None:
        files["overrides.yaml"] = overrides
    folder = write(tmp_path, files)
    return convert(folder / "template.yaml", folder / "overrides.yaml" if overrides else None, **kw)


def problems(tmp_path: Path, template: str, overrides: str | None = None) -> str:
    folder = write(
        tmp_path,
        {"template.yaml": template, **({"overrides.yaml": overrides} if overrides else {})},
    )
    with pytest.raises(ConfigError) as caught:
        load_template(folder / "template.yaml", folder / "overrides.yaml" if overrides else None)
    return str(caught.value)


def test_sqs_with_redrive(tmp_path: Path) -> None:
    folder = write(tmp_path, {"template.yaml": SQS_WITH_REDRIVE, "overrides.yaml": SQS_OVERRIDES})
    config, notes = load_template(folder / "template.yaml", folder / "overrides.yaml")

    [mapping] = config.event_source_mappings
    assert mapping.name == "QueueConsumerFunction-MySQSEvent"
    assert mapping.function == "QueueConsumerFunction"
    assert mapping.source.type == "sqs"
    assert mapping.source.queue_url == "http://127.0.0.1:4566/123456789012/orders"  # type: ignore[attr-defined]
    assert mapping.batch_size == 10
    assert mapping.maximum_batching_window_s == 2
    assert mapping.function_response_types == ["ReportBatchItemFailures"]
    assert mapping.filter_criteria is not None
    assert mapping.filter_criteria.filters[0].pattern == '{"body": {"kind": ["order"]}}'
    # Lambda has no retry limit for SQS: the queue's redrive policy decides (5 receives).
    assert mapping.maximum_retry_attempts == 4
    assert mapping.destination_config is None
    spec = config.function_spec("QueueConsumerFunction")
    assert spec.handler == "app.lambda_handler"
    assert (spec.timeout_s, spec.memory_mb, spec.isolation) == (15, 128, "thread")
    assert spec.environment == {
        "TABLE": "orders",
        "QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/MySqsQueue",
        "EXTRA": "1",
    }
    assert spec.code_paths == (str(folder / "src"),)
    assert notes.not_mappings == ["QueueConsumerFunction.Everyday (Schedule)"]
    assert notes.ignored == ["QueueConsumerFunction: Architectures", "Outputs"]
    assert mapping.scaling_config is not None
    assert mapping.scaling_config.maximum_concurrency == 5


KAFKA_WITH_DESTINATION = """\
    Transform: AWS::Serverless-2016-10-31
    Parameters:
      KafkaBootstrap: {Type: String, Default: "b-1.example.com:9092,b-2.example.com:9092"}
      Topic: {Type: String, Default: orders}
    Resources:
      Failures: {Type: AWS::SQS::Queue}
      Consumer:
        Type: AWS::Serverless::Function
        Properties:
          Runtime: python3.12
          CodeUri: src/
          Handler: app.handle
          ReservedConcurrentExecutions: 3
          Events:
            Orders:
              Type: SelfManagedKafka
              Properties:
                KafkaBootstrapServers: [!Ref KafkaBootstrap]
                Topics: [!Ref Topic]
                ConsumerGroupId: !Sub "${Topic}-consumer"
                StartingPosition: AT_TIMESTAMP
                StartingPositionTimestamp: 1700000000
                BatchSize: 500
                BisectBatchOnFunctionError: true
                MaximumRetryAttempts: 2
                MaximumRecordAgeInSeconds: 3600
                SourceAccessConfigurations:
                  - Type: BASIC_AUTH
                    URI: arn:aws:secretsmanager:us-east-1:123456789012:secret:kafka
                DestinationConfig:
                  OnFailure: {Destination: !GetAtt Failures.Arn}
    """


def test_self_managed_kafka_with_a_destination(tmp_path: Path) -> None:
    overrides = """\
        parameters: {KafkaBootstrap: "127.0.0.1:9092"}
        sources:
          KafkaBootstrap: {client_config: {session.timeout.ms: 6000}}
        destinations:
          Failures: {type: file, path: ./letters}
        """
    folder = write(tmp_path, {"template.yaml": KAFKA_WITH_DESTINATION, "overrides.yaml": overrides})
    config, notes = load_template(folder / "template.yaml", folder / "overrides.yaml")

    [mapping] = config.event_source_mappings
    source: Any = mapping.source
    assert mapping.name == "Consumer-Orders"
    assert (source.type, source.bootstrap_servers, source.topics) == (
        "kafka",
        "127.0.0.1:9092",
        ["orders"],
    )
    assert source.consumer_group_id == "orders-consumer"
    assert source.starting_position == "AT_TIMESTAMP"
    assert source.starting_position_timestamp_ms == 1_700_000_000_000
    assert source.client_config == {"session.timeout.ms": 6000}
    assert source.event_source_arn is None
    assert (mapping.batch_size, mapping.maximum_retry_attempts) == (500, 2)
    assert mapping.bisect_batch_on_function_error is True
    assert mapping.maximum_record_age_s == 3600
    assert mapping.destination_config is not None
    assert mapping.destination_config.on_failure.type == "file"
    assert config.function_spec("Consumer").concurrency == 3
    assert notes.access == [
        "Consumer-Orders: the template's SourceAccessConfigurations are BASIC_AUTH"
        " arn:aws:secretsmanager:us-east-1:123456789012:secret:kafka: here, credentials come"
        " through ${VAR} in its entry of the overrides file"
    ]


def test_a_destination_needs_an_entry_unless_it_is_a_kafka_topic(tmp_path: Path) -> None:
    message = problems(tmp_path, KAFKA_WITH_DESTINATION)
    assert "template.yaml: Resources.Consumer.Properties.Events.Orders.Properties" in message
    assert ".DestinationConfig.OnFailure.Destination: the on-failure destination" in message
    assert "keyed by 'Failures' or 'arn:aws:sqs:us-east-1:123456789012:Failures'" in message

    topic = KAFKA_WITH_DESTINATION.replace("!GetAtt Failures.Arn", "kafka://orders-failures")
    data = converted(tmp_path, topic).data
    [mapping] = data["event_source_mappings"]
    assert mapping["destination_config"] == {
        "on_failure": {"type": "kafka", "topic": "orders-failures"}
    }
    # The bootstrap servers are the template's own: no entry needed.
    assert mapping["source"]["bootstrap_servers"] == "b-1.example.com:9092,b-2.example.com:9092"


MSK = """\
    Transform: AWS::Serverless-2016-10-31
    Resources:
      MSKCluster:
        Type: AWS::MSK::Cluster
        Properties: {ClusterName: orders-cluster, KafkaVersion: 3.5.1, NumberOfBrokerNodes: 2}
      StreamFunction:
        Type: AWS::Serverless::Function
        Properties:
          Runtime: python3.12
          CodeUri: src/
          Handler: app.handler
          Events:
            MSKEvent:
              Type: MSK
              Properties:
                Stream: !GetAtt MSKCluster.Arn
                Topics: [orders]
                StartingPosition: LATEST
                ConsumerGroupId: analytics
    """


def test_msk(tmp_path: Path) -> None:
    message = problems(tmp_path, MSK)
    assert "Resources.StreamFunction.Properties.Events.MSKEvent.Properties.Stream" in message
    assert "MSK cluster MSKCluster (arn:aws:kafka:us-east-1:123456789012:cluster/" in message
    assert "the overrides file needs an entry saying where it is here" in message
    assert "sources: {MSKCluster: {bootstrap_servers: HOST:PORT}}" in message

    overrides = "sources: {MSKCluster: {bootstrap_servers: '127.0.0.1:9092'}}\n"
    folder = write(tmp_path, {"template.yaml": MSK, "overrides.yaml": overrides})
    config, _ = load_template(folder / "template.yaml", folder / "overrides.yaml")
    source: Any = config.event_source_mappings[0].source
    assert source.bootstrap_servers == "127.0.0.1:9092"
    assert source.consumer_group_id == "analytics"
    assert source.starting_position == "LATEST"
    # Handlers get MSK's event, with the cluster's ARN.
    assert source.event_source_arn.startswith(
        "arn:aws:kafka:us-east-1:123456789012:cluster/orders-cluster/"
    )


MQ = """\
    Transform: AWS::Serverless-2016-10-31
    Parameters:
      MQBrokerArn: {Type: String}
      MQBrokerUserSecret: {Type: String}
    Resources:
      MQConsumer:
        Type: AWS::Serverless::Function
        Properties:
          Runtime: python3.12
          CodeUri: src/
          Handler: app.lambda_handler
          Events:
            MQEvent:
              Type: MQ
              Properties:
                Broker: !Ref MQBrokerArn
                Queues: [orders]
                BatchSize: 10
                SourceAccessConfigurations:
                  - {Type: BASIC_AUTH, URI: !Ref MQBrokerUserSecret}
                  - {Type: VIRTUAL_HOST, URI: /shop}
    """
MQ_ARN = "arn:aws:mq:us-east-1:123456789012:broker:shop:b-1234"
MQ_OVERRIDES = f"""\
    parameters:
      MQBrokerArn: {MQ_ARN}
      MQBrokerUserSecret: arn:aws:secretsmanager:us-east-1:123456789012:secret:mq
    sources:
      MQBrokerArn: {{url: "amqp://${{MQ_USER}}:${{MQ_PASSWORD}}@127.0.0.1:5672/shop"}}
    """


def test_mq_with_basic_auth(tmp_path: Path) -> None:
    folder = write(tmp_path, {"template.yaml": MQ, "overrides.yaml": MQ_OVERRIDES})
    environ = {"MQ_USER": "shop", "MQ_PASSWORD": "s3cret"}
    config, notes = load_template(
        folder / "template.yaml", folder / "overrides.yaml", environ=environ
    )
    [mapping] = config.event_source_mappings
    source: Any = mapping.source
    assert (source.type, source.queue, source.virtual_host) == ("rabbitmq", "orders", "shop")
    assert source.url == "amqp://shop:s3cret@127.0.0.1:5672/shop"
    assert mapping.batch_size == 10
    assert notes.access[0].startswith(
        "MQConsumer-MQEvent: the template's SourceAccessConfigurations are BASIC_AUTH"
        " arn:aws:secretsmanager:us-east-1:123456789012:secret:mq, VIRTUAL_HOST /shop"
    )
    # Keyed by the ARN itself, too.
    by_arn = MQ_OVERRIDES.replace("MQBrokerArn: {url", f'"{MQ_ARN}": {{url')
    (folder / "overrides.yaml").write_text(textwrap.dedent(by_arn))
    config, _ = load_template(folder / "template.yaml", folder / "overrides.yaml", environ=environ)
    assert config.event_source_mappings[0].source.type == "rabbitmq"
    # An unset variable is named where the overrides file uses it.
    with pytest.raises(ConfigError) as caught:
        load_template(folder / "template.yaml", folder / "overrides.yaml", environ={})
    assert "overrides.yaml: sources" in str(caught.value)
    assert "environment variable MQ_USER is not set" in str(caught.value)


RAW = """\
    AWSTemplateFormatVersion: '2010-09-09'
    Description: Plain CloudFormation, as `aws cloudformation package` takes it
    Parameters:
      StreamArn: {Type: String, Default: "arn:aws:kinesis:us-east-1:123456789012:stream/clicks"}
    Resources:
      Queue: {Type: AWS::SQS::Queue, Properties: {QueueName: jobs}}
      Worker:
        Type: AWS::Lambda::Function
        Properties:
          FunctionName: job-worker
          Runtime: python3.11
          Handler: worker.handle
          Code: ./code
          Timeout: 60
          MemorySize: 1024
          Role: !GetAtt Role.Arn
          TracingConfig: {Mode: Active}
      Alias:
        Type: AWS::Lambda::Alias
        Properties: {FunctionName: !Ref Worker, FunctionVersion: "1", Name: live}
      Node:
        Type: AWS::Lambda::Function
        Properties: {Runtime: nodejs20.x, Handler: index.handler, Code: ./code}
      JobsMapping:
        Type: AWS::Lambda::EventSourceMapping
        Properties:
          FunctionName: !Ref Alias
          EventSourceArn: !GetAtt Queue.Arn
          BatchSize: 5
          Enabled: false
          MaximumBatchingWindowInSeconds: 1
          Tags: [{Key: team, Value: jobs}]
      ByName:
        Type: AWS::Lambda::EventSourceMapping
        Properties:
          FunctionName: job-worker
          EventSourceArn: arn:aws:sqs:us-east-1:123456789012:other
      Clicks:
        Type: AWS::Lambda::EventSourceMapping
        Properties:
          FunctionName: !Ref Worker
          EventSourceArn: !Ref StreamArn
          StartingPosition: LATEST
      NodeJobs:
        Type: AWS::Lambda::EventSourceMapping
        Properties: {FunctionName: !Ref Node, EventSourceArn: !GetAtt Queue.Arn}
    """
RAW_OVERRIDES = """\
    sources:
      Queue: {queue_url: "http://127.0.0.1:4566/123456789012/jobs"}
      "arn:aws:sqs:us-east-1:123456789012:other": {queue_url: "http://127.0.0.1:4566/123456789012/other"}
    """


def test_raw_event_source_mapping(tmp_path: Path) -> None:
    folder = write(tmp_path, {"template.yaml": RAW, "overrides.yaml": RAW_OVERRIDES})
    config, notes = load_template(folder / "template.yaml", folder / "overrides.yaml")

    jobs, by_name = config.event_source_mappings
    assert (jobs.name, jobs.function, jobs.enabled, jobs.batch_size) == (
        "JobsMapping",
        "Worker",
        False,
        5,
    )
    assert jobs.maximum_batching_window_s == 1
    assert (by_name.name, by_name.function) == ("ByName", "Worker")
    spec = config.function_spec("Worker")
    assert (spec.timeout_s, spec.memory_mb) == (60, 1024)
    assert spec.code_paths == (str(folder / "code"),)
    assert list(config.functions) == ["Worker"]
    assert notes.skipped == [
        "Node: runtime nodejs20.x cannot run here (Python)",
        "Clicks (Kinesis streams cannot be read here"
        " (arn:aws:kinesis:us-east-1:123456789012:stream/clicks))",
        "NodeJobs (its function Node cannot run here)",
    ]
    assert notes.not_applied == ["JobsMapping: Tags"]
    assert notes.ignored == ["Worker: Role, TracingConfig"]
    # --strict: what cannot run is an error (exit 2 from the command line).
    with pytest.raises(ConfigError) as caught:
        load_template(folder / "template.yaml", folder / "overrides.yaml", strict=True)
    assert "template.yaml: --strict: cannot run here: Clicks (Kinesis" in str(caught.value)


def test_events_that_cannot_run_are_named_and_skipped(tmp_path: Path) -> None:
    template = SQS_WITH_REDRIVE.replace(
        "            Everyday:",
        "            Stream:\n"
        "              Type: DynamoDB\n"
        "              Properties: {Stream: !GetAtt Table.StreamArn, StartingPosition: LATEST}\n"
        "            Everyday:",
    ).replace(
        "      MyDeadLetterQueue:",
        "      Table: {Type: AWS::DynamoDB::Table}\n      MyDeadLetterQueue:",
    )
    notes = converted(tmp_path, template, SQS_OVERRIDES).notes
    assert notes.skipped == [
        "QueueConsumerFunction-Stream (DynamoDB streams cannot be read here"
        " (arn:aws:dynamodb:us-east-1:123456789012:table/Table/stream/1970-01-01T00:00:00.000))"
    ]
    assert notes.not_mappings == ["QueueConsumerFunction.Everyday (Schedule)"]
    with pytest.raises(ConfigError) as caught:
        load_template(tmp_path / "template.yaml", tmp_path / "overrides.yaml", strict=True)
    text = str(caught.value)
    assert "--strict: not an event source mapping: QueueConsumerFunction.Everyday" in text
    assert "--strict: cannot run here: QueueConsumerFunction-Stream" in text


def test_an_activemq_broker_is_skipped(tmp_path: Path) -> None:
    template = """\
        Resources:
          Broker: {Type: AWS::AmazonMQ::Broker, Properties: {EngineType: ACTIVEMQ}}
          Fn:
            Type: AWS::Lambda::Function
            Properties: {Runtime: python3.12, Handler: app.handle, Code: src}
          FromBroker:
            Type: AWS::Lambda::EventSourceMapping
            Properties: {FunctionName: !Ref Fn, EventSourceArn: !GetAtt Broker.Arn, Queues: [q]}
        """
    message = problems(tmp_path, template)
    assert "no event source mapping of the template runs here (skipped: FromBroker" in message
    assert "ActiveMQ brokers cannot be read here (RabbitMQ ones can)" in message


@pytest.mark.parametrize(
    ("change", "overrides", "expected"),
    [
        (
            ("BatchSize: 10", "BatchSize: 20000"),
            SQS_OVERRIDES,
            "template.yaml: Resources.QueueConsumerFunction.Properties.Events.MySQSEvent"
            ".Properties.BatchSize: must be",
        ),
        (
            ("BatchSize: 10", "BatchSize: lots"),
            SQS_OVERRIDES,
            "template.yaml: SAM transform: Resource with id [QueueConsumerFunctionMySQSEvent] is"
            " invalid. Type of property 'BatchSize' is invalid.",
        ),
        (
            None,
            SQS_OVERRIDES.replace("queue_url: http", "queue_url: ftp"),
            "overrides.yaml: sources.MySqsQueue.queue_url: bad URL: scheme must be",
        ),
        (
            None,
            SQS_OVERRIDES.replace("isolation: thread", "isolation: fibre"),
            "overrides.yaml: functions.QueueConsumerFunction.isolation: must be 'process' or"
            " 'thread'",
        ),
        (
            None,
            SQS_OVERRIDES.replace("MySqsQueue:", "MySqsQeue:"),
            "overrides.yaml: sources.MySqsQeue: the template has no source named 'MySqsQeue'"
            " (did you mean 'MySqsQueue'?)",
        ),
        (
            None,
            SQS_OVERRIDES + "parameters: {Stage: prod}\n",
            "overrides.yaml: parameters.Stage: the template has no such parameter",
        ),
        (
            None,
            SQS_OVERRIDES + "mappings: {}\n",
            "overrides.yaml: mappings: unknown key (known keys: parameters, sources,",
        ),
        (
            (
                "Handler: app.lambda_handler",
                "Handler: app.lambda_handler\n          Layers: [!Ref Nope]",
            ),
            SQS_OVERRIDES,
            "template.yaml: Resources.QueueConsumerFunction.Properties.Layers[0].Ref: 'Nope' is"
            " neither a parameter nor a resource of the template",
        ),
        (
            ("CodeUri: src/", "CodeUri: missing/"),
            SQS_OVERRIDES,
            "template.yaml: Resources.QueueConsumerFunction.Properties.CodeUri: no directory"
            " 'missing/' beside the template",
        ),
        (
            ("Queue: !GetAtt MySqsQueue.Arn", "Queue: !GetAtt Missing.Arn"),
            SQS_OVERRIDES,
            "template.yaml: Resources.QueueConsumerFunction.Properties.Events.MySQSEvent"
            ".Properties.Queue",
        ),
    ],
)
def test_problems_name_the_file_and_the_key(
    tmp_path: Path, change: tuple[str, str] | None, overrides: str, expected: str
) -> None:
    template = SQS_WITH_REDRIVE.replace(*change) if change else SQS_WITH_REDRIVE
    assert expected in problems(tmp_path, template, overrides)


def test_a_queue_needs_an_entry(tmp_path: Path) -> None:
    message = problems(tmp_path, SQS_WITH_REDRIVE)
    assert (
        "template.yaml: Resources.QueueConsumerFunction.Properties.Events.MySQSEvent.Properties"
        ".Queue: SQS queue MySqsQueue (arn:aws:sqs:us-east-1:123456789012:MySqsQueue): the"
        " overrides file needs an entry saying where it is here (sources: {MySqsQueue:"
        " {queue_url: " in message
    )
