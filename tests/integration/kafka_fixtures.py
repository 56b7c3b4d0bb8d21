"""A secured broker and a three-broker cluster for the session, each started by infra/kafka/up on ports of its own
(9092 stays the plain broker of the other tests) and wiped at the end. Whichever of the two the session's tests
use are started together, at the first test that needs one: each start is a few JVMs on a small machine."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import HARNESS_VARIABLES, ROOT, _unavailable
from trainwire.infra.config import Settings

UP, DOWN = ROOT / "infra/kafka/up", ROOT / "infra/kafka/down"
SECURE_PORT, CLUSTER_PORT = 19292, 19392
SECURE_PREFIX = f"test-secure-{uuid.uuid4().hex[:8]}."  # the topics made and granted by up --secure
CACHE = Path(os.environ.get("TRAINWIRE_KAFKA_CACHE", Path.home() / ".cache/trainwire/kafka"))


def script_env(port: int) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_") or k in HARNESS_VARIABLES},
            "TRAINWIRE_KAFKA_PORT": str(port), "TRAINWIRE_PYTHON": sys.executable}


class _Deployment:
    """infra/kafka/up running in the background, then what it printed; down at the end."""

    def __init__(self, port: int, up_args: list[str], down_args: list[str]):
        self.port, self._down_args = port, down_args
        self._up = subprocess.Popen([str(UP), *up_args], env=script_env(port), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        self._printed: str | None = None
        self.stopped = False

    def printed(self) -> str:
        if self._printed is None:
            try:
                out, err = self._up.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                self._up.kill()
                _unavailable(f"infra/kafka/up on port {self.port} did not finish within 600 s")
            if self._up.returncode != 0:
                _unavailable(f"infra/kafka/up on port {self.port} failed: {err[-3000:]}")
            self._printed = out
        return self._printed

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self._up.poll() is None:
            self._up.communicate(timeout=600)
        subprocess.run([str(DOWN), *self._down_args, "--wipe"], env=script_env(self.port), capture_output=True,
                       timeout=120)


_PLANS = {
    "secure_kafka": (SECURE_PORT, ["--secure", "--topic-prefix", SECURE_PREFIX], []),
    "kafka_cluster": (CLUSTER_PORT, ["--brokers", "3"], ["--brokers", "3"]),
}
_deployments: dict[str, _Deployment] = {}


def _deployment(request: pytest.FixtureRequest, name: str) -> _Deployment:
    if name not in _deployments:
        wanted = {f for item in request.session.items for f in item.fixturenames if f in _PLANS} | {name}
        for other in sorted(wanted - _deployments.keys()):
            _deployments[other] = _Deployment(*_PLANS[other])
            # stopped even if its own fixture never runs (the session ended first)
            request.addfinalizer(_deployments[other].stop)
    return _deployments[name]


def stop_those_no_later_test_needs(session: pytest.Session, next_item: pytest.Item | None) -> None:
    """Idle, the four JVMs of the secured broker and the cluster still take about a sixth of a core: each deployment
    is stopped once no test left to run uses it, not at the end of the session (the unit tests ran beside them)."""
    running = {name: deployment for name, deployment in _deployments.items() if not deployment.stopped}
    if not running:
        return
    later = session.items[session.items.index(next_item):] if next_item is not None else []
    needed = {name for item in later for name in item.fixturenames if name in running}
    for name in running.keys() - needed:
        running[name].stop()


@dataclass(frozen=True)
class SecureKafka:
    """The secured broker: its bootstrap, CA, and each principal's config file (the passwords are in those)."""

    bootstrap: str
    ca: Path
    config_files: dict[str, Path]
    prefix: str = SECURE_PREFIX

    def password(self, principal: str) -> str:
        return tomllib.loads(self.config_files[principal].read_text())["kafka"]["sasl_password"]

    def settings(self, principal: str, home: Path, **overrides) -> Settings:
        fields = {"home": home, "kafka": self.bootstrap, "kafka_security_protocol": "SASL_SSL",
                  "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": principal,
                  "kafka_sasl_password": self.password(principal), "kafka_ssl_ca_location": self.ca,
                  "topic_prefix": self.prefix, "batch_max_seconds": 0.2}
        return Settings(**(fields | overrides))

    def cli_env(self, principal: str, home: Path, **variables: str) -> dict[str, str]:
        """For a `trainwire` process: the principal's config file as written by up --secure, then `variables`."""
        return {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
                "TRAINWIRE_CONFIG": str(self.config_files[principal]), "TRAINWIRE_HOME": str(home),
                "TRAINWIRE_BATCH_MAX_SECONDS": "0.2", **variables}


@pytest.fixture(scope="session")
def secure_kafka(request: pytest.FixtureRequest) -> SecureKafka:
    printed = _deployment(request, "secure_kafka").printed().splitlines()
    files = {line.split(" ", 2)[1]: Path(line.rsplit("TRAINWIRE_CONFIG=", 1)[1])
             for line in printed if "TRAINWIRE_CONFIG=" in line}
    ca = next(Path(line.split("=", 1)[1]) for line in printed if line.startswith("TRAINWIRE_KAFKA_SSL_CA_LOCATION="))
    return SecureKafka(bootstrap=printed[-1], ca=ca, config_files=files)


@dataclass(frozen=True)
class KafkaCluster:
    bootstrap: str

    def ports(self) -> dict[int, int]:
        """Node id → broker port (node i listens on the first port + 2(i-1))."""
        return {i: int(server.rsplit(":", 1)[1]) for i, server in enumerate(self.bootstrap.split(","), start=1)}

    def pid(self, node_id: int) -> int:
        return int((CACHE / f"broker-{self.ports()[node_id]}.pid").read_text())


@pytest.fixture(scope="session")
def kafka_cluster(request: pytest.FixtureRequest) -> KafkaCluster:
    return KafkaCluster(bootstrap=_deployment(request, "kafka_cluster").printed().splitlines()[-1])
