"""Shared test fixtures: paths to ../shared data (skipped with a reason when absent) and a small
random checkpoint written once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("YUAN_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "yuan2-m32-tiny-a"
TOKENIZER = SHARED / "tokenizer" / "yuan2"

torch.set_num_threads(1)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(
            f"{what} not found at {path} (it lives in ../shared beside the repo; "
            "set YUAN_SHARED to point elsewhere)"
        )
    return path


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return _need(FIXTURE / "golden.json", "golden fixture").parent


@pytest.fixture(scope="session")
def golden(fixture_dir: Path) -> dict:
    return json.loads((fixture_dir / "golden.json").read_text())


@pytest.fixture(scope="session")
def golden_tensors(fixture_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(fixture_dir / "golden_logits.safetensors"))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return _need(TOKENIZER / "tokenizer.model", "Yuan tokenizer").parent


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Random-weight `tiny` preset checkpoint, the same kind the main job serves."""
    from model.checkpoint import write_random_checkpoint
    from model.config import preset

    return write_random_checkpoint(preset("tiny"), tmp_path_factory.mktemp("ckpt") / "tiny", seed=7)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session, shut down at the end."""
    import ray

    from cluster.ray_cluster import connect

    started = connect(num_cpus=16)
    yield ray
    if started:
        ray.shutdown()


def settled_stats(stub, timeout: float = 10.0):
    """A server's Stats once nothing runs (cancellations apply at the next step boundary)."""
    import time

    from protos import serving_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        stats = stub.Stats(pb.StatsRequest())
        if (stats.running == 0 and stats.waiting == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


@pytest.fixture
def pool_set(ray_cluster, fixture_dir):
    """Start expert pools of the golden fixture on the shared cluster (`pool_set(pools=2, ...)`),
    without a controller; every set is shut down at the end."""
    from cluster.pools import PoolConfig, PoolSet

    started = []

    def _start(**kwargs) -> PoolSet:
        ps = PoolSet(PoolConfig(str(fixture_dir), **kwargs))
        ps.start()
        started.append(ps)
        return ps

    yield _start
    for ps in started:
        ps.shutdown()


@pytest.fixture
def cluster_app(ray_cluster, fixture_dir):
    """An application on the shared cluster: its controller and pools, and gateways attached to it in
    this process (`cluster_app(pools=2, ...)` -> (app name, first gateway's Backend); more with
    `.attach()`); everything is closed and stopped at the end."""
    import uuid

    from cluster.controller import ControlConfig, stop_controller
    from cluster.gateway_host import attach_backend
    from cluster.pools import PoolConfig

    apps, backends = [], []

    class App:
        def __init__(self, control: ControlConfig, **kwargs) -> None:
            self.name = f"test-{uuid.uuid4().hex[:8]}"
            self.pools, self.control = PoolConfig(str(fixture_dir), **kwargs), control
            apps.append(self.name)

        def attach(self):
            backend = attach_backend(self.name, self.pools, self.control)
            backends.append(backend)
            return backend

        @property
        def controller(self):
            from cluster.controller import controller_name
            from cluster.pools import NAMESPACE

            return ray_cluster.get_actor(controller_name(self.name), namespace=NAMESPACE)

    def _start(control: ControlConfig = ControlConfig(), **kwargs) -> App:
        return App(control, **kwargs)

    yield _start
    for b in backends:
        b.close()
    for name in apps:
        stop_controller(name)
