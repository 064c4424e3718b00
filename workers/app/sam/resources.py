"""What a template's resources would be called on AWS: each one's `Ref` and attributes.

A queue's ARN, a table's stream ARN, a cluster's ARN are made up here the way AWS forms them,
from the resource's name property (or its logical id), the region and the account of the
overrides file (us-east-1 and 123456789012 by default). They only label records and name
sources; where a source really is comes from the overrides file.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from workers.engine.settings import Loc

if TYPE_CHECKING:
    from workers.app.sam.intrinsics import Resolver

__all__ = ["Resources"]

# The property holding a resource's physical name, by type.
_NAME_PROPERTY = {
    "AWS::SQS::Queue": "QueueName",
    "AWS::SNS::Topic": "TopicName",
    "AWS::S3::Bucket": "BucketName",
    "AWS::Kinesis::Stream": "Name",
    "AWS::DynamoDB::Table": "TableName",
    "AWS::MSK::Cluster": "ClusterName",
    "AWS::MSK::ServerlessCluster": "ClusterName",
    "AWS::AmazonMQ::Broker": "BrokerName",
    "AWS::Lambda::Function": "FunctionName",
    "AWS::Lambda::LayerVersion": "LayerName",
    "AWS::SecretsManager::Secret": "Name",
    "AWS::IAM::Role": "RoleName",
    "AWS::DocDB::DBCluster": "DBClusterIdentifier",
}


class Resources(Mapping[str, Mapping[str, Any]]):
    """The template's resources by logical id, with what `Ref` and `Fn::GetAtt` give for them."""

    def __init__(self, resources: Mapping[str, Any], resolver: Resolver) -> None:
        self._resources = {k: v for k, v in resources.items() if isinstance(v, dict)}
        self._resolver = resolver

    def __getitem__(self, logical_id: str) -> Mapping[str, Any]:
        return self._resources[logical_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resources)

    def __len__(self) -> int:
        return len(self._resources)

    def type_of(self, logical_id: str) -> str:
        return str(self._resources[logical_id].get("Type", ""))

    def properties(self, logical_id: str) -> Mapping[str, Any]:
        properties = self._resources[logical_id].get("Properties")
        return properties if isinstance(properties, dict) else {}

    def prop(self, logical_id: str, key: str, default: Any = None) -> Any:
        """A property's value, evaluated; `default` when the resource does not set it."""
        properties = self.properties(logical_id)
        if key not in properties:
            return default
        return self._resolver.value(properties[key], self.loc(logical_id, key))

    def loc(self, logical_id: str, *keys: str | int) -> Loc:
        return ("Resources", logical_id, "Properties", *keys)

    def exists(self, logical_id: str) -> bool:
        """False when the resource has a `Condition` that is false (the stack would not have it)."""
        condition = self._resources[logical_id].get("Condition")
        if condition is None:
            return True
        return self._resolver.condition(condition, ("Resources", logical_id, "Condition"))

    def of_type(self, *types: str) -> list[str]:
        """Logical ids of the resources of these types that exist, in template order."""
        return [i for i in self._resources if self.type_of(i) in types and self.exists(i)]

    # --- Ref and Fn::GetAtt ----------------------------------------------------------------------

    def name(self, logical_id: str) -> str:
        """The resource's physical name: its name property, else its logical id."""
        kind = self.type_of(logical_id)
        key = _NAME_PROPERTY.get(kind)
        named = self.prop(logical_id, key) if key else None
        if isinstance(named, str) and named:
            return named
        if kind == "AWS::SQS::Queue" and str(self.prop(logical_id, "FifoQueue")).lower() == "true":
            return f"{logical_id}.fifo"
        return logical_id

    def _id(self, logical_id: str) -> str:
        # Stable made-up identifiers (a cluster's UUID, a broker's id) from the logical id.
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"esm-workers:{logical_id}"))

    def arn(self, logical_id: str) -> str:
        r = self._resolver
        p, region, account = r.partition, r.region, r.account
        kind, name = self.type_of(logical_id), self.name(logical_id)
        service = kind.split("::")[1].lower() if kind.count("::") == 2 else "unknown"
        forms = {
            "AWS::SQS::Queue": f"arn:{p}:sqs:{region}:{account}:{name}",
            "AWS::SNS::Topic": f"arn:{p}:sns:{region}:{account}:{name}",
            "AWS::S3::Bucket": f"arn:{p}:s3:::{name}",
            "AWS::Kinesis::Stream": f"arn:{p}:kinesis:{region}:{account}:stream/{name}",
            "AWS::DynamoDB::Table": f"arn:{p}:dynamodb:{region}:{account}:table/{name}",
            "AWS::MSK::Cluster": (
                f"arn:{p}:kafka:{region}:{account}:cluster/{name}/{self._id(logical_id)}-1"
            ),
            "AWS::AmazonMQ::Broker": (
                f"arn:{p}:mq:{region}:{account}:broker:{name}:b-{self._id(logical_id)}"
            ),
            "AWS::Lambda::Function": f"arn:{p}:lambda:{region}:{account}:function:{name}",
            "AWS::Lambda::LayerVersion": f"arn:{p}:lambda:{region}:{account}:layer:{name}:1",
            "AWS::SecretsManager::Secret": (
                f"arn:{p}:secretsmanager:{region}:{account}:secret:{name}"
            ),
            "AWS::IAM::Role": f"arn:{p}:iam::{account}:role/{name}",
            "AWS::DocDB::DBCluster": f"arn:{p}:rds:{region}:{account}:cluster:{name}",
        }
        forms["AWS::MSK::ServerlessCluster"] = forms["AWS::MSK::Cluster"]
        return forms.get(kind, f"arn:{p}:{service}:{region}:{account}:{name}")

    def ref(self, logical_id: str, loc: Loc) -> Any:
        kind = self.type_of(logical_id)
        if kind == "AWS::SQS::Queue":
            return self.attribute(logical_id, "QueueUrl", loc)
        if kind in (
            "AWS::SNS::Topic",
            "AWS::MSK::Cluster",
            "AWS::MSK::ServerlessCluster",
            "AWS::Lambda::LayerVersion",
            "AWS::SecretsManager::Secret",
        ):
            return self.arn(logical_id)
        if kind == "AWS::AmazonMQ::Broker":
            return f"b-{self._id(logical_id)}"
        if kind in _NAME_PROPERTY:
            return self.name(logical_id)
        return logical_id

    def attribute(self, logical_id: str, attribute: str, loc: Loc) -> Any:
        kind = self.type_of(logical_id)
        r = self._resolver
        if attribute in ("Arn", "TopicArn", "LayerVersionArn"):
            return self.arn(logical_id)
        if kind == "AWS::SQS::Queue":
            if attribute == "QueueUrl":
                return f"https://sqs.{r.region}.amazonaws.com/{r.account}/{self.name(logical_id)}"
            if attribute == "QueueName":
                return self.name(logical_id)
        if kind == "AWS::DynamoDB::Table" and attribute == "StreamArn":
            return f"{self.arn(logical_id)}/stream/1970-01-01T00:00:00.000"
        if attribute in ("Name", "TopicName", "QueueName"):
            return self.name(logical_id)
        # Any other attribute (an endpoint, an id) has no value here: a marker that says which.
        return f"{logical_id}.{attribute}"
