"""Execution environments against real child processes and threads (no broker, no mocks)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from connectors.kafka.shape import KafkaMeta, KafkaShape
from workers.engine.invoker import FunctionSpec, InvocationRequest, PackedEvent
from workers.engine.outcomes import (
    Crash,
    FunctionError,
    InvalidResponse,
    InvokeResult,
    RetryLater,
    Success,
    Throttling,
    Timeout,
)
from workers.engine.records import Record
from workers.invoke import ProcessInvoker, ThreadInvoker, create_invoker

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = "tests.handlers.misbehaving"

Factory = Callable[..., ProcessInvoker]


def request(request_id: str = "req-1", attempt: int = 1) -> InvocationRequest:
    return InvocationRequest(
        request_id=request_id, mapping_name="orders-from-kafka", attempt=attempt
    )


def spec(handler: str, **overrides: Any) -> FunctionSpec:
    settings: dict[str, Any] = {"timeout_s": 10.0, "memory_mb": 256, "concurrency": 1}
    settings.update(overrides)
    return FunctionSpec(name="orders", handler=handler, **settings)


@pytest.fixture
def process_invoker(process_invokers: Callable[[FunctionSpec], ProcessInvoker]) -> Factory:
    def make(function: str, **overrides: Any) -> ProcessInvoker:
        return process_invokers(spec(f"{HANDLERS}:{function}", **overrides))

    return make


@pytest.fixture
def thread_invoker() -> Iterator[Callable[..., ThreadInvoker]]:
    saved_environ = dict(os.environ)
    saved_path = list(sys.path)
    created: list[ThreadInvoker] = []

    def make(function: str, **overrides: Any) -> ThreadInvoker:
        with contextlib.chdir(ROOT):
            invoker = ThreadInvoker(spec(f"{HANDLERS}:{function}", **overrides))
        created.append(invoker)
        return invoker

    yield make
    for invoker in created:
        invoker.close()
    # Threads abandoned by a timeout keep their function's variables until their handler returns.
    deadline = time.monotonic() + 10
    while any(i.stats.environments for i in created) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(invoker.stats.environments == 0 for invoker in created)
    # Once every function is closed and its threads have ended, nothing of theirs is left.
    assert without_pytest(os.environ) == without_pytest(saved_environ)
    assert sys.path == saved_path


def without_pytest(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own


def in_background(call: Callable[[], InvokeResult]) -> tuple[threading.Thread, list[InvokeResult]]:
    results: list[InvokeResult] = []
    thread = threading.Thread(target=lambda: results.append(call()), daemon=True)
    thread.start()
    return thread, results


# -- process isolation ---------------------------------------------------------------------


def test_success_returns_the_decoded_response(process_invoker: Factory) -> None:
    invoker = process_invoker("echo")
    event = {"eventSource": "SelfManagedKafka", "records": {"orders-0": [{"offset": 1}]}}

    assert invoker.invoke(event, request()) == Success(response=event)


def test_a_packed_batch_is_built_into_its_event_in_the_environment(
    process_invoker: Factory,
) -> None:
    shape = KafkaShape("127.0.0.1:9092")
    meta = KafkaMeta("orders", 0)
    records = [
        Record("orders-0", i, b"v%d" % i, b"k", 1_700_000_000_000, meta=meta) for i in (4, 5)
    ]
    invoker = process_invoker("echo")

    result = invoker.invoke_packed(PackedEvent(shape.unpacker, shape.pack(records)), request())

    assert result == Success(response=shape.event(records))


def test_a_packed_batch_that_cannot_be_built_fails_the_invocation_not_the_environment(
    process_invoker: Factory,
) -> None:
    invoker = process_invoker("echo")

    broken = invoker.invoke_packed(PackedEvent(KafkaShape.unpacker, b"not marshal"), request())

    assert isinstance(broken, FunctionError)
    assert broken.error.error_type == "Runtime.EventBuildError"
    assert invoker.invoke({"n": 1}, request()) == Success({"n": 1})
    assert invoker.stats.crashes == 0


def test_spawn_start_method_works_too() -> None:
    with contextlib.chdir(ROOT):
        invoker = ProcessInvoker(spec(f"{HANDLERS}:echo"), start_method="spawn")
    try:
        assert invoker.invoke({"n": 1}, request()) == Success({"n": 1})
    finally:
        invoker.close()


def test_handler_exception_is_a_function_error_with_type_message_and_stack(
    process_invoker: Factory,
) -> None:
    result = process_invoker("raises").invoke({"n": 7}, request())

    assert isinstance(result, FunctionError)
    assert result.error.error_type == "ValueError"
    assert result.error.message == "bad record 7"
    assert "misbehaving.py" in result.error.stack_trace[0]
    assert "in raises" in result.error.stack_trace[0]
    assert not any("workers/invoke" in line for line in result.error.stack_trace)


def test_retryable_error_asks_for_a_retry(process_invoker: Factory) -> None:
    result = process_invoker("retryable").invoke({}, request())

    assert isinstance(result, RetryLater)
    assert result.error.error_type == "RetryableError"
    assert result.error.message == "downstream unavailable"


def test_throttled_asks_for_a_pause_and_keeps_the_environment(process_invoker: Factory) -> None:
    invoker = process_invoker("throttled")
    for _ in range(2):
        result = invoker.invoke({}, request())
        assert isinstance(result, Throttling)
        assert result.error.error_type == "RateLimited"
        assert result.error.message == "429 from the downstream API"
    assert invoker.stats.cold_starts == 1


def test_timeout_kills_the_environment_and_the_next_invocation_gets_a_fresh_one(
    process_invoker: Factory,
) -> None:
    invoker = process_invoker("sleeps", timeout_s=1)

    result = invoker.invoke({"seconds": 30}, request())

    assert isinstance(result, Timeout)
    assert result.error.error_type == "Sandbox.Timedout"
    assert result.error.message == "Task timed out after 1.00 seconds"
    assert invoker.invoke({"seconds": 0}, request("req-2")) == Success({"slept": 0})
    assert (invoker.stats.timeouts, invoker.stats.cold_starts) == (1, 2)


def test_a_hung_invocation_does_not_hold_up_another_environment(process_invoker: Factory) -> None:
    invoker = process_invoker("sleeps", timeout_s=2, concurrency=2)
    hung, hung_results = in_background(lambda: invoker.invoke({"seconds": 30}, request("hung")))

    assert invoker.invoke({"seconds": 0}, request("quick")) == Success({"slept": 0})
    assert hung_results == []  # still running while the other one finished

    hung.join(timeout=30)
    assert isinstance(hung_results[0], Timeout)


def test_os_exit_is_a_crash_with_the_exit_status(process_invoker: Factory) -> None:
    invoker = process_invoker("os_exit")

    result = invoker.invoke({"status": 3}, request())

    assert isinstance(result, Crash)
    assert result.error.error_type == "Runtime.ExitError"
    assert result.error.message == (
        "RequestId: req-1 Error: Runtime exited with error: exit status 3"
    )
    assert invoker.stats.crashes == 1
    assert invoker.stats.environments == 0


def test_killed_by_a_signal_is_a_crash_naming_the_signal(process_invoker: Factory) -> None:
    invoker = process_invoker("sigkill_self")

    result = invoker.invoke({}, request())

    assert isinstance(result, Crash)
    assert "Runtime exited with error: signal: killed" in result.error.message


def test_memory_over_the_limit_is_a_clear_error_and_the_environment_is_replaced(
    process_invoker: Factory,
) -> None:
    invoker = process_invoker("alloc", memory_mb=128)

    result = invoker.invoke({"mb": 256}, request())

    assert isinstance(result, Crash)
    assert result.error.error_type == "Runtime.OutOfMemory"
    assert "memory limit of 128 MB exceeded" in result.error.message
    assert invoker.invoke({"mb": 32}, request("req-2")) == Success({"allocated_mb": 32})
    assert invoker.stats.cold_starts == 2


def test_one_cold_start_per_environment(process_invoker: Factory) -> None:
    invoker = process_invoker("pid")

    pids = {invoker.invoke({}, request(f"req-{n}")) for n in range(20)}

    assert len(pids) == 1
    assert invoker.stats.cold_starts == 1
    assert invoker.stats.invocations == 20
    assert invoker.stats.environments == 1


def test_async_handler(process_invoker: Factory) -> None:
    invoker = process_invoker("async_echo")

    assert invoker.invoke({"n": 1}, request()) == Success({"async": True, "event": {"n": 1}})
    # The event loop is kept for the environment's next invocation.
    assert invoker.invoke({"n": 2}, request()) == Success({"async": True, "event": {"n": 2}})


def test_unencodable_response_is_an_invalid_response(process_invoker: Factory) -> None:
    invoker = process_invoker("returns_garbage")

    result = invoker.invoke({}, request())

    assert isinstance(result, InvalidResponse)
    assert result.error.error_type == "Runtime.MarshalError"
    assert result.error.message.startswith("Unable to marshal response: ")
    assert invoker.stats.environments == 1  # the environment itself is fine


def test_context_has_lambdas_attributes(process_invoker: Factory) -> None:
    invoker = process_invoker("context_attributes", memory_mb=192, timeout_s=5)

    result = invoker.invoke({}, request("req-ctx", attempt=3))

    assert isinstance(result, Success)
    context = result.response
    assert context["function_name"] == "orders"
    assert context["function_version"] == "$LATEST"
    assert context["invoked_function_arn"] == "arn:aws:lambda:local:000000000000:function:orders"
    assert context["memory_limit_in_mb"] == 192
    assert context["aws_request_id"] == "req-ctx"
    assert context["log_group_name"] == "/aws/lambda/orders"
    assert "[$LATEST]" in context["log_stream_name"]
    assert 0 < context["remaining_ms"] <= 5000
    assert context["mapping_name"] == "orders-from-kafka"
    assert context["attempt"] == 3
    # As awslambdaric: an identity object whose fields are None, no client context or tenant.
    assert context["identity"] == {"cognito_identity_id": None, "cognito_identity_pool_id": None}
    assert context["client_context"] is None
    assert context["tenant_id"] is None


def test_environment_variables_are_visible_to_the_handler(process_invoker: Factory) -> None:
    invoker = process_invoker("reads_env", environment={"LOG_LEVEL": "DEBUG"}, memory_mb=200)
    names = [
        "LOG_LEVEL",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_TIMEOUT",
    ]

    result = invoker.invoke({"names": names}, request())

    assert result == Success(
        {
            "LOG_LEVEL": "DEBUG",
            "AWS_LAMBDA_FUNCTION_NAME": "orders",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "200",
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_TIMEOUT": "10",
        }
    )


def test_lambda_runtime_variables_are_set(
    process_invoker: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    names = ["AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "LAMBDA_TASK_ROOT"]

    result = process_invoker("reads_env").invoke({"names": names}, request())

    assert isinstance(result, Success)
    assert result.response["AWS_REGION"] == "us-east-1"
    assert result.response["AWS_DEFAULT_REGION"] == "us-east-1"
    assert result.response["AWS_EXECUTION_ENV"].startswith("AWS_Lambda_python3.")
    assert result.response["LAMBDA_TASK_ROOT"] == str(ROOT)


def test_region_is_inherited_from_the_environment(
    process_invoker: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)

    result = process_invoker("reads_env").invoke(
        {"names": ["AWS_REGION", "AWS_DEFAULT_REGION"]}, request()
    )

    assert result == Success({"AWS_REGION": "eu-west-3", "AWS_DEFAULT_REGION": "eu-west-3"})


@pytest.mark.parametrize("isolation", ["process", "thread"])
@pytest.mark.parametrize(
    ("inherited", "expected"),
    [
        ({}, "eu-central-1"),
        # The worker's environment wins, as it does for Lambda's own variables.
        ({"AWS_DEFAULT_REGION": "ap-south-1"}, "ap-south-1"),
        ({"AWS_REGION": "sa-east-1", "AWS_DEFAULT_REGION": "sa-east-1"}, "sa-east-1"),
    ],
)
def test_region_is_the_functions_own_unless_the_environment_sets_one(
    isolation: str,
    inherited: dict[str, str],
    expected: str,
    process_invoker: Factory,
    thread_invoker: Callable[..., ThreadInvoker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make = process_invoker if isolation == "process" else thread_invoker
    # Undone before the invoker fixtures check that the process's variables are as they were.
    with monkeypatch.context() as patch:
        for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            patch.delenv(name, raising=False)
        for name, value in inherited.items():
            patch.setenv(name, value)
        invoker = make("reads_env", region="eu-central-1")
        result = invoker.invoke({"names": ["AWS_REGION", "AWS_DEFAULT_REGION"]}, request())
        invoker.close()

    assert result == Success({"AWS_REGION": expected, "AWS_DEFAULT_REGION": expected})


def test_context_log_reaches_the_log_with_the_request_id(
    process_invoker: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workers.function.orders")

    assert process_invoker("logs_through_context").invoke({}, request("req-log")) == Success(None)

    lines = [r.getMessage() for r in caplog.records if r.name == "workers.function.orders"]
    assert "[req-log] logged through context.log" in lines


def test_handler_output_reaches_the_log_with_the_request_id(
    process_invoker: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workers.function.orders")
    invoker = process_invoker("prints")

    assert invoker.invoke({"word": "kiwi"}, request("req-out")) == Success(None)

    lines = [r.getMessage() for r in caplog.records if r.name == "workers.function.orders"]
    assert "[req-out] hello from the handler: kiwi" in lines
    assert "[req-out] a line on stderr" in lines
    assert "[req-out] partial line without newline" in lines
    assert "[req-out] [INFO] tests.handlers.misbehaving: a log record: kiwi" in lines


def test_missing_module_is_an_import_error_every_time(process_invoker: Factory) -> None:
    with contextlib.chdir(ROOT):
        invoker = ProcessInvoker(spec("tests.handlers.no_such_module:handler"))
    try:
        for attempt in (1, 2):
            result = invoker.invoke({}, request(attempt=attempt))
            assert isinstance(result, FunctionError)
            assert result.error.error_type == "Runtime.ImportModuleError"
            assert result.error.message == (
                "Unable to import module 'tests.handlers.no_such_module': "
                "No module named 'tests.handlers.no_such_module'"
            )
        assert invoker.stats.environments == 0
        assert invoker.stats.cold_starts == 0
    finally:
        invoker.close()


def test_missing_function_is_handler_not_found(process_invoker: Factory) -> None:
    result = process_invoker("no_such_function").invoke({}, request())

    assert isinstance(result, FunctionError)
    assert result.error.error_type == "Runtime.HandlerNotFound"
    assert result.error.message == (f"Handler 'no_such_function' missing on module '{HANDLERS}'")


def test_close_during_an_invocation_returns_a_crash_promptly(process_invoker: Factory) -> None:
    invoker = process_invoker("prints_then_sleeps", timeout_s=60)
    started = threading.Event()

    class Started(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "sleeping now" in record.getMessage():
                started.set()

    log = logging.getLogger("workers.function.orders")
    handler = Started()
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.INFO)
    try:
        running, results = in_background(lambda: invoker.invoke({"seconds": 60}, request()))
        assert started.wait(timeout=20)
        invoker.close()
        running.join(timeout=20)
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)

    assert not running.is_alive()
    assert isinstance(results[0], Crash)
    assert "shut down" in results[0].error.message
    invoker.close()  # idempotent
    assert isinstance(invoker.invoke({}, request()), Crash)


# -- thread isolation ----------------------------------------------------------------------


def test_create_invoker_honours_isolation(thread_invoker: Callable[..., ThreadInvoker]) -> None:
    with contextlib.chdir(ROOT):
        threaded = create_invoker(spec(f"{HANDLERS}:ok", isolation="thread"))
        processes = create_invoker(spec(f"{HANDLERS}:ok"))
    try:
        assert isinstance(threaded, ThreadInvoker)
        assert isinstance(processes, ProcessInvoker)
    finally:
        threaded.close()
        processes.close()


def test_thread_success(thread_invoker: Callable[..., ThreadInvoker]) -> None:
    invoker = thread_invoker("echo")
    event = {"records": {"orders-0": [{"offset": 1}]}}

    assert invoker.invoke(event, request()) == Success(response=event)
    assert invoker.invoke(event, request()) == Success(response=event)
    assert invoker.stats.cold_starts == 1


def test_thread_async_handler(thread_invoker: Callable[..., ThreadInvoker]) -> None:
    invoker = thread_invoker("async_echo")

    assert invoker.invoke({"n": 1}, request()) == Success({"async": True, "event": {"n": 1}})


def test_thread_raises(thread_invoker: Callable[..., ThreadInvoker]) -> None:
    result = thread_invoker("raises").invoke({"n": 2}, request())

    assert isinstance(result, FunctionError)
    assert (result.error.error_type, result.error.message) == ("ValueError", "bad record 2")
    assert "in raises" in result.error.stack_trace[0]


def test_thread_retryable_and_garbage(thread_invoker: Callable[..., ThreadInvoker]) -> None:
    assert isinstance(thread_invoker("retryable").invoke({}, request()), RetryLater)
    throttled = thread_invoker("throttled").invoke({}, request())
    assert isinstance(throttled, Throttling) and throttled.error.error_type == "RateLimited"
    garbage = thread_invoker("returns_garbage").invoke({}, request())
    assert isinstance(garbage, InvalidResponse)


def test_thread_timeout(thread_invoker: Callable[..., ThreadInvoker]) -> None:
    invoker = thread_invoker("sleeps", timeout_s=1)

    result = invoker.invoke({"seconds": 1.5}, request())

    assert isinstance(result, Timeout)
    assert result.error.message == "Task timed out after 1.00 seconds"
    assert invoker.stats.timeouts == 1
    assert invoker.invoke({"seconds": 0}, request()) == Success({"slept": 0})


def test_thread_import_error(thread_invoker: Callable[..., ThreadInvoker]) -> None:
    result = thread_invoker("no_such_function").invoke({}, request())

    assert isinstance(result, FunctionError)
    assert result.error.error_type == "Runtime.HandlerNotFound"


# -- what one thread-isolated function's variables and path do to other functions ------------


def named(name: str, function: str, **overrides: Any) -> FunctionSpec:
    settings: dict[str, Any] = {"timeout_s": 10.0, "concurrency": 1, "isolation": "thread"}
    settings.update(overrides)
    return FunctionSpec(name=name, handler=f"{HANDLERS}:{function}", **settings)


def make_invoker(spec_: FunctionSpec, directory: Path = ROOT) -> ThreadInvoker | ProcessInvoker:
    with contextlib.chdir(directory):
        invoker = create_invoker(spec_)
    assert isinstance(invoker, ThreadInvoker | ProcessInvoker)
    return invoker


NAMES = ["ONLY_ALPHA", "AWS_LAMBDA_FUNCTION_NAME", "_HANDLER"]


def test_a_thread_function_sees_its_variables_and_the_next_function_does_not() -> None:
    before = {name: os.environ.get(name) for name in NAMES}
    alpha = make_invoker(named("alpha", "reads_env", environment={"ONLY_ALPHA": "yes"}))
    beta = make_invoker(named("beta", "reads_env"))
    try:
        seen_by_alpha = alpha.invoke({"names": NAMES}, request())
        seen_by_beta = beta.invoke({"names": NAMES}, request())
        seen_by_alpha_again = alpha.invoke({"names": NAMES}, request())
    finally:
        alpha.close()
        beta.close()

    alpha_sees = {
        "ONLY_ALPHA": "yes",
        "AWS_LAMBDA_FUNCTION_NAME": "alpha",
        "_HANDLER": f"{HANDLERS}:reads_env",
    }
    assert seen_by_alpha == Success(alpha_sees)
    assert seen_by_beta == Success(
        {
            "ONLY_ALPHA": None,
            "AWS_LAMBDA_FUNCTION_NAME": "beta",
            "_HANDLER": f"{HANDLERS}:reads_env",
        }
    )
    assert seen_by_alpha_again == Success(alpha_sees)
    # Closed, neither leaves anything in the worker's own environment.
    assert {name: os.environ.get(name) for name in NAMES} == before


def test_a_thread_function_that_returned_leaves_nothing_to_one_still_running() -> None:
    from tests.handlers import misbehaving

    misbehaving.STARTED.clear()
    misbehaving.GATE.clear()
    alpha = make_invoker(named("alpha", "reads_env", environment={"ONLY_ALPHA": "yes"}))
    beta = make_invoker(named("beta", "reads_env_when_let_through"))
    try:
        running, results = in_background(lambda: beta.invoke({"names": NAMES}, request()))
        assert misbehaving.STARTED.wait(timeout=20)
        # Both running at once share the process's variables (documented); alpha returns first.
        assert alpha.invoke({"names": ["ONLY_ALPHA"]}, request()) == Success({"ONLY_ALPHA": "yes"})
        misbehaving.GATE.set()
        running.join(timeout=20)
    finally:
        misbehaving.GATE.set()
        alpha.close()
        beta.close()

    assert results == [
        Success(
            {
                "ONLY_ALPHA": None,
                "AWS_LAMBDA_FUNCTION_NAME": "beta",
                "_HANDLER": f"{HANDLERS}:reads_env_when_let_through",
            }
        )
    ]


def test_a_process_function_does_not_inherit_a_thread_function_variables() -> None:
    alpha = make_invoker(named("alpha", "reads_env", environment={"ONLY_ALPHA": "yes"}))
    try:
        assert alpha.invoke({"names": ["ONLY_ALPHA"]}, request()) == Success({"ONLY_ALPHA": "yes"})
        # Alpha's variables stay applied while nothing else runs; a child must not get them.
        beta = make_invoker(named("beta", "reads_env", isolation="process"))
        try:
            result = beta.invoke({"names": NAMES}, request())
        finally:
            beta.close()
    finally:
        alpha.close()

    assert result == Success(
        {
            "ONLY_ALPHA": None,
            "AWS_LAMBDA_FUNCTION_NAME": "beta",
            "_HANDLER": f"{HANDLERS}:reads_env",
        }
    )


def test_a_thread_function_import_path_is_not_another_function_import_path(
    tmp_path: Path,
) -> None:
    # Names of their own, so that nothing is found already imported in sys.modules.
    suffix = uuid.uuid4().hex[:12]
    helper, alpha_module, beta_module = (f"{n}_{suffix}" for n in ("helper", "alpha", "beta"))
    alpha_dir, beta_dir = tmp_path / "alpha", tmp_path / "beta"
    alpha_dir.mkdir()
    beta_dir.mkdir()
    (alpha_dir / f"{helper}.py").write_text("VALUE = 'from alpha'\n")
    (alpha_dir / f"{alpha_module}.py").write_text(
        f"import {helper}\n\ndef handler(event, context):\n    return {helper}.VALUE\n"
    )
    (beta_dir / f"{beta_module}.py").write_text(
        f"def handler(event, context):\n    import {helper}\n    return {helper}.VALUE\n"
    )
    alpha = make_invoker(
        FunctionSpec(name="alpha", handler=f"{alpha_module}:handler", isolation="thread"),
        alpha_dir,
    )
    beta = make_invoker(
        FunctionSpec(name="beta", handler=f"{beta_module}:handler", isolation="thread"), beta_dir
    )
    try:
        assert beta.invoke({}, request()) != Success("from alpha")  # before alpha ever ran
        assert alpha.invoke({}, request()) == Success("from alpha")
        helper_module = sys.modules.pop(helper)  # sys.modules is shared: see the README
        result = beta.invoke({}, request())
    finally:
        alpha.close()
        beta.close()

    assert helper_module.VALUE == "from alpha"
    assert isinstance(result, FunctionError)
    assert result.error.error_type == "ModuleNotFoundError"
    assert str(alpha_dir) not in sys.path
    assert str(beta_dir) not in sys.path
