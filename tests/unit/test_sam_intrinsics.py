"""CloudFormation's intrinsic functions and conditions as `workers.app.sam.intrinsics` evaluates
them, and what a template's resources are called (`Ref`, `Fn::GetAtt`)."""

from __future__ import annotations

from typing import Any

import pytest

from workers.app.sam.intrinsics import NO_VALUE, Origin, Resolver, TemplateError

TEMPLATE: dict[str, Any] = {
    "Parameters": {
        "Stage": {"Type": "String", "Default": "dev", "AllowedValues": ["dev", "prod"]},
        "Brokers": {"Type": "CommaDelimitedList", "Default": "a:9092, b:9092"},
        "Size": {"Type": "Number", "Default": "25"},
        "Required": {"Type": "String"},
        "FromSsm": {"Type": "AWS::SSM::Parameter::Value<String>", "Default": "/shop/topic"},
    },
    "Mappings": {"Sizes": {"dev": {"Batch": 5}, "prod": {"Batch": 100}}},
    "Conditions": {
        "IsProd": {"Fn::Equals": [{"Ref": "Stage"}, "prod"]},
        "IsDev": {"Fn::Not": [{"Condition": "IsProd"}]},
        "Either": {"Fn::Or": [{"Condition": "IsProd"}, {"Condition": "IsDev"}]},
        "Both": {"Fn::And": [{"Condition": "IsProd"}, {"Condition": "IsDev"}]},
        "Loop": {"Condition": "Loop"},
    },
    "Resources": {
        "Queue": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": "orders"}},
        "Fifo": {"Type": "AWS::SQS::Queue", "Properties": {"FifoQueue": True}},
        "Table": {"Type": "AWS::DynamoDB::Table"},
        "Cluster": {"Type": "AWS::MSK::Cluster", "Properties": {"ClusterName": "shop"}},
        "Broker": {"Type": "AWS::AmazonMQ::Broker", "Properties": {"BrokerName": "mq"}},
        "Topic": {"Type": "AWS::SNS::Topic"},
        "ProdOnly": {"Type": "AWS::SQS::Queue", "Condition": "IsProd"},
    },
}


def resolver(**parameters: Any) -> Resolver:
    return Resolver(TEMPLATE, parameters)


def value(node: Any, **parameters: Any) -> Any:
    return resolver(**parameters).value(node, ("x",))


def test_ref_to_parameters_with_their_types_and_defaults() -> None:
    assert value({"Ref": "Stage"}) == "dev"
    assert value({"Ref": "Stage"}, Stage="prod") == "prod"
    assert value({"Ref": "Brokers"}) == ["a:9092", "b:9092"]
    assert value({"Ref": "Size"}) == 25
    assert value({"Ref": "Required"}, Required="given") == "given"
    assert value({"Ref": "AWS::Region"}) == "us-east-1"
    assert value({"Ref": "AWS::AccountId"}, **{"AWS::AccountId": "000000000000"}) == (
        "000000000000"
    )


@pytest.mark.parametrize(
    ("node", "parameters", "words"),
    [
        ({"Ref": "Required"}, {}, "parameter Required has no Default: give it a value"),
        ({"Ref": "FromSsm"}, {}, "read from SSM Parameter Store on AWS"),
        ({"Ref": "Stage"}, {"Stage": "qa"}, "'qa' is not one of its AllowedValues (dev, prod)"),
        ({"Ref": "Nothing"}, {}, "'Nothing' is neither a parameter nor a resource"),
        ({"Fn::GetAtt": ["Nope", "Arn"]}, {}, "no resource named 'Nope'"),
        ({"Fn::FindInMap": ["Sizes", "qa", "Batch"]}, {}, "no key 'qa' in Mappings.Sizes"),
        ({"Fn::If": ["Unknown", 1, 2]}, {}, "no condition named 'Unknown'"),
        ({"Fn::If": ["Loop", 1, 2]}, {}, "the condition refers to itself"),
        ({"Fn::ImportValue": "shared-vpc"}, {}, "Fn::ImportValue cannot be evaluated here"),
        ({"Fn::Join": [","]}, {}, "must be a list of 2 items"),
    ],
)
def test_what_cannot_be_evaluated_says_why(
    node: Any, parameters: dict[str, Any], words: str
) -> None:
    with pytest.raises(TemplateError) as caught:
        value(node, **parameters)
    assert words in caught.value.message


def test_resources_are_named_as_aws_names_them() -> None:
    assert value({"Fn::GetAtt": ["Queue", "Arn"]}) == "arn:aws:sqs:us-east-1:123456789012:orders"
    assert value({"Fn::GetAtt": "Queue.QueueName"}) == "orders"
    assert value({"Ref": "Queue"}) == "https://sqs.us-east-1.amazonaws.com/123456789012/orders"
    assert value({"Fn::GetAtt": ["Fifo", "QueueName"]}) == "Fifo.fifo"
    assert value({"Fn::GetAtt": ["Table", "StreamArn"]}).startswith(
        "arn:aws:dynamodb:us-east-1:123456789012:table/Table/stream/"
    )
    assert value({"Ref": "Topic"}) == "arn:aws:sns:us-east-1:123456789012:Topic"
    cluster = value({"Ref": "Cluster"}, **{"AWS::Region": "eu-west-1"})
    assert cluster.startswith("arn:aws:kafka:eu-west-1:123456789012:cluster/shop/")
    assert cluster == value({"Fn::GetAtt": ["Cluster", "Arn"]}, **{"AWS::Region": "eu-west-1"})
    assert value({"Fn::GetAtt": ["Broker", "Arn"]}).startswith(
        "arn:aws:mq:us-east-1:123456789012:broker:mq:b-"
    )
    # An attribute with no value here says which it is.
    assert value({"Fn::GetAtt": ["Cluster", "BootstrapBrokers"]}) == "Cluster.BootstrapBrokers"


def test_sub_join_select_split() -> None:
    assert value({"Fn::Sub": "${AWS::StackName}-${Stage}-${Queue.Arn}"}) == (
        "local-dev-arn:aws:sqs:us-east-1:123456789012:orders"
    )
    assert value({"Fn::Sub": ["${Name}-${!Literal}", {"Name": {"Ref": "Stage"}}]}) == (
        "dev-${Literal}"
    )
    assert value({"Fn::Join": [",", {"Ref": "Brokers"}]}) == "a:9092,b:9092"
    assert value({"Fn::Join": ["", ["size-", {"Ref": "Size"}, "-", True]]}) == "size-25-true"
    assert value({"Fn::Select": [1, {"Ref": "Brokers"}]}) == "b:9092"
    assert value({"Fn::Select": ["0", {"Fn::Split": ["/", "a/b"]}]}) == "a"
    assert value({"Fn::Base64": "hi"}) == "aGk="


def test_find_in_map_with_a_reference_and_a_default() -> None:
    node = {"Fn::FindInMap": ["Sizes", {"Ref": "Stage"}, "Batch"]}
    assert value(node) == 5
    assert value(node, Stage="prod") == 100
    fallback = {"Fn::FindInMap": ["Sizes", "qa", "Batch", {"DefaultValue": 1}]}
    assert value(fallback) == 1


def test_conditions_and_if() -> None:
    dev, prod = resolver(), resolver(Stage="prod")
    assert (dev.condition("IsProd", ()), prod.condition("IsProd", ())) == (False, True)
    assert dev.condition("IsDev", ()) and dev.condition("Either", ())
    assert not dev.condition("Both", ())
    assert dev.value({"Fn::If": ["IsProd", 100, 10]}, ()) == 10
    assert prod.value({"Fn::If": ["IsProd", 100, 10]}, ()) == 100
    # AWS::NoValue removes the property or the list item.
    node = {
        "A": {"Fn::If": ["IsProd", 1, {"Ref": "AWS::NoValue"}]},
        "B": [1, {"Ref": "AWS::NoValue"}],
    }
    assert dev.value(node, ()) == {"B": [1]}
    assert dev.value({"Ref": "AWS::NoValue"}, ()) is NO_VALUE
    # A resource whose condition is false is not in the stack.
    assert dev.resources.of_type("AWS::SQS::Queue") == ["Queue", "Fifo"]
    assert "ProdOnly" in prod.resources.of_type("AWS::SQS::Queue")


def test_origin_names_what_a_value_refers_to() -> None:
    r = resolver()
    assert r.origin({"Fn::GetAtt": ["Queue", "Arn"]}, ()) == Origin("resource", "Queue")
    assert r.origin({"Fn::GetAtt": "Cluster.Arn"}, ()) == Origin("resource", "Cluster")
    assert r.origin({"Ref": "Stage"}, ()) == Origin("parameter", "Stage")
    assert r.origin({"Fn::Sub": "${Queue.Arn}"}, ()) == Origin("resource", "Queue")
    assert r.origin({"Fn::If": ["IsProd", {"Ref": "Topic"}, {"Ref": "Queue"}]}, ()) == Origin(
        "resource", "Queue"
    )
    assert r.origin({"Fn::Sub": "arn:${AWS::Partition}:sqs:x"}, ()) is None
    assert r.origin("arn:aws:sqs:us-east-1:123456789012:orders", ()) is None
