"""What the README's install paths rely on: a wheel built from the checkout holds every package
and registers every connector, and docker-compose.yml (documented for users with Docker; no
Docker runs here) is a Compose file that starts the brokers on the ports the examples use."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_a_built_wheel_holds_every_package_and_registers_every_connector(tmp_path: Path) -> None:
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps"]  # as the README says
    done = subprocess.run(
        [*build, "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("esm_workers-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        registered = archive.read(entry_points).decode()
    for package in ("workers/engine", "workers/invoke", "workers/app", "connectors/kafka"):
        assert f"{package}/__init__.py" in names, package
    # Every connector of the checkout, registered under the group the registry reads.
    connectors = sorted(p.parent.name for p in (REPO / "connectors").glob("*/__init__.py"))
    section = registered.split("[esm_workers.connectors]", 1)[1].split("[", 1)[0]
    for name in connectors:
        assert f"{name} = connectors.{name}:CONNECTOR" in section, name
    assert "workers = workers.app.cli:main" in registered
    # Package data: the status page served at `/`.
    assert "workers/app/status_page.html" in names


def test_the_compose_file_starts_the_brokers_on_the_ports_the_examples_use() -> None:
    compose: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"kafka", "rabbitmq", "redis"}
    published = {
        name: {str(port).rsplit(":", 2)[-2] for port in service["ports"]}
        for name, service in services.items()
    }
    assert "9092" in published["kafka"] and "5672" in published["rabbitmq"]
    assert "6379" in published["redis"]
    for service in services.values():
        assert isinstance(service["image"], str) and ":" in service["image"]  # a pinned tag
        # Bound to the loopback interface, as the project's endpoints are by default.
        assert all(str(port).startswith("127.0.0.1:") for port in service["ports"])
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert advertised == "PLAINTEXT://localhost:9092"
