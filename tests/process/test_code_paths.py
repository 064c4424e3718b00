"""A function's `code_paths` (a SAM function's CodeUri and layers): first on its handler's import
path, relative to the configuration file, the first one its LAMBDA_TASK_ROOT; two functions
with a module of the same name each get their own, as each SAM function's `app.py` does."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from workers.app.config import Config, ConfigError, load_config
from workers.engine.invoker import InvocationRequest
from workers.engine.outcomes import Success
from workers.invoke import create_invoker

APP = """\
    import os

    import shared

    def {name}(event, context):
        return {{"function": "{name}", "root": os.environ["LAMBDA_TASK_ROOT"], "shared": shared.X}}
    """


@pytest.fixture
def config(tmp_path: Path) -> Config:
    for name in ("orders", "payments"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "app.py").write_text(textwrap.dedent(APP.format(name=name)))
    (tmp_path / "layer" / "python").mkdir(parents=True)
    (tmp_path / "layer" / "python" / "shared.py").write_text("X = 'from the layer'\n")
    path = tmp_path / "mappings.yaml"
    functions = {
        name: {"handler": f"app.{name}", "code_paths": [name, "layer/python"]}
        for name in ("orders", "payments")
    }
    mappings = [
        {"name": name, "function": name, "source": {"type": "memory", "topic": name}}
        for name in functions
    ]
    import yaml

    path.write_text(yaml.safe_dump({"functions": functions, "event_source_mappings": mappings}))
    return load_config(path, environ={})


def test_code_paths_are_relative_to_the_file(config: Config, tmp_path: Path) -> None:
    spec = config.function_spec("orders")
    assert spec.code_paths == (str(tmp_path / "orders"), str(tmp_path / "layer" / "python"))
    assert spec.task_root("/elsewhere") == str(tmp_path / "orders")


def test_each_function_imports_its_own_module(config: Config, tmp_path: Path) -> None:
    config.check_handlers()  # app.orders from orders/, app.payments from payments/
    assert "app" not in sys.modules and "shared" not in sys.modules
    (tmp_path / "payments" / "app.py").write_text("raise RuntimeError('broken')\n")
    with pytest.raises(ConfigError) as caught:
        config.check_handlers()
    assert "functions.payments.handler: importing 'app' failed: RuntimeError" in str(caught.value)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_invocations_run_from_the_code_paths(
    config: Config, tmp_path: Path, isolation: Literal["process", "thread"]
) -> None:
    for name in ("orders", "payments"):
        spec = config.function_spec(name)
        invoker = create_invoker(dataclasses.replace(spec, isolation=isolation))
        try:
            result = invoker.invoke({}, InvocationRequest("r", mapping_name=name, attempt=1))
        finally:
            invoker.close()
        assert isinstance(result, Success), result
        assert result.response == {
            "function": name,
            "root": str(tmp_path / name),
            "shared": "from the layer",
        }
        if isolation == "thread":
            # Only one thread-isolated function can have `app` in this process (documented):
            # forget it, as a second worker process would not have it.
            sys.modules.pop("app", None)
            sys.modules.pop("shared", None)
