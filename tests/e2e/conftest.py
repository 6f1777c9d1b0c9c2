"""End to end on a real node: the dev control plane plus a kubelet with containerd and runc
(tests/realnode/node.py) running the trainer image built without Docker (tests/realnode/images.py).

Collected only with FORGE_E2E=1 (``scripts/test --e2e``): building the node's binaries and the
trainer image takes minutes on a cold machine, and every test here runs real pods. Each test
records how long its steps took in ``TIMINGS`` (printed at the end of the session).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "realnode"))

from devcluster import DevCluster  # noqa: E402
from images import trainer_image  # noqa: E402

TIMINGS: dict[str, float] = {}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def image():
    t = time.monotonic()
    img = trainer_image()
    TIMINGS["trainer image build (or cache hit)"] = time.monotonic() - t
    return img


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, image) -> DevCluster:
    """The control plane with one real node (no fake GPU nodes), the trainer image imported."""
    c = DevCluster(tmp_path_factory.mktemp("e2e"), gpu_nodes=0, real_nodes=1)
    t = time.monotonic()
    c.up()
    TIMINGS["control plane up"] = time.monotonic() - t
    try:
        for node in c.start_real_nodes([image]):
            for step, seconds in node.timings.items():
                TIMINGS[f"{node.name}: {step}"] = seconds
        yield c
    finally:
        c.down()


@pytest.fixture(scope="session")
def node(cluster):
    return cluster.real_nodes()[0]


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "e2e step timings")
        for step, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{seconds:8.1f}s  {step}")
