"""Templates beyond their mappings: layers and Globals as code paths, `workers sam convert`'s
output read back as a mapping file, a mapping file told from a template, and the template reader
against CloudFormation's own decoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.unit.test_sam_convert import MQ, MQ_OVERRIDES, MSK, converted, write
from workers.app.config import ConfigError, parse_config
from workers.app.loader import load
from workers.app.sam import convert, render_yaml


def test_layers_globals_and_code_paths(tmp_path: Path) -> None:
    template = """\
        Transform: AWS::Serverless-2016-10-31
        Globals:
          Function:
            Runtime: python3.12
            Layers:
              - !Ref Built
              - arn:aws:lambda:us-east-1:017000801446:layer:Powertools:7
        Resources:
          Built: {Type: AWS::Serverless::LayerVersion, Properties: {ContentUri: layers/built}}
          Plain: {Type: AWS::Serverless::LayerVersion, Properties: {ContentUri: layers/plain}}
          Queue: {Type: AWS::SQS::Queue}
          Fn:
            Type: AWS::Serverless::Function
            Properties:
              CodeUri: src
              Handler: app.handler
              Layers: [!Ref Plain]
              Events:
                Jobs: {Type: SQS, Properties: {Queue: !GetAtt Queue.Arn}}
        """
    import sys

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = f"layers/built/python/lib/{version}/site-packages"
    for directory in ("layers/plain", site):
        (tmp_path / directory).mkdir(parents=True)
    overrides = "sources: {Queue: {queue_url: 'http://127.0.0.1:4566/123456789012/q'}}\n"
    conversion = converted(tmp_path, template, overrides)
    function = conversion.data["functions"]["Fn"]
    # Lambda's order: the function's code, then each layer's python/ (site-packages first).
    assert function["code_paths"] == ["src", site, "layers/built/python", "layers/plain"]
    assert function["timeout_s"] == 3 and function["memory_mb"] == 128  # Lambda's defaults
    assert conversion.notes.other == [
        "Fn: layer arn:aws:lambda:us-east-1:017000801446:layer:Powertools:7 is not here:"
        " install what it provides"
        " in the environment `workers` runs in"
    ]


def test_sam_convert_prints_an_equivalent_mapping_file(tmp_path: Path) -> None:
    overrides = MQ_OVERRIDES
    template = MQ.replace("Queues: [orders]", "Queues: [!Sub 'orders-${!literal}']")
    conversion = converted(tmp_path, template, overrides, substituted=False)
    text = render_yaml(conversion)
    assert text.startswith(
        f"# Converted from {tmp_path / 'template.yaml'} by `workers sam convert`."
    )
    data = yaml.safe_load(text)
    source = data["event_source_mappings"][0]["source"]
    # The overrides' ${VAR} stay as written; the template's own `${` are written `$${`.
    assert source["url"] == "amqp://${MQ_USER}:${MQ_PASSWORD}@127.0.0.1:5672/shop"
    assert source["queue"] == "orders-$${literal}"
    (tmp_path / "converted.yaml").write_text(text)
    config = parse_config(text, tmp_path / "converted.yaml", {"MQ_USER": "u", "MQ_PASSWORD": "p"})
    source = config.event_source_mappings[0].source
    assert (source.url, source.queue) == ("amqp://u:p@127.0.0.1:5672/shop", "orders-${literal}")  # type: ignore[attr-defined]
    assert config.functions["MQConsumer"].code_paths == ["src"]


def test_a_mapping_file_and_a_template_are_told_apart(tmp_path: Path) -> None:
    folder = write(
        tmp_path,
        {
            "template.yaml": MSK,
            "overrides.yaml": "sources: {MSKCluster: {bootstrap_servers: 'h:1'}}\n",
        },
    )
    loaded = load(folder / "template.yaml", folder / "overrides.yaml")
    assert loaded.config.event_source_mappings[0].name == "StreamFunction-MSKEvent"
    native = tmp_path / "mappings.yaml"
    native.write_text(render_yaml(convert(folder / "template.yaml", folder / "overrides.yaml")))
    assert load(native).config.event_source_mappings[0].name == "StreamFunction-MSKEvent"
    with pytest.raises(ConfigError) as caught:
        load(native, folder / "overrides.yaml")
    assert "--overrides goes with a SAM or CloudFormation template" in str(caught.value)


def test_the_template_reader_agrees_with_cfn_lint(tmp_path: Path) -> None:
    """CloudFormation's own decoder reads examples/sam/template.yaml as this reader does."""
    import json

    from cfnlint.decode import decode

    from workers.app.sam.template import read_template

    example = Path(__file__).resolve().parents[2] / "examples" / "sam" / "template.yaml"
    reference, matches = decode(str(example))
    assert not matches
    assert read_template(example) == json.loads(json.dumps(reference))
