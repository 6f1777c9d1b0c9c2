"""Fixtures for operator tests."""

from __future__ import annotations

import sys

import pytest

from operator_support import OperatorProcess, create_pvcs


@pytest.fixture
def operator(crds, kube, tmp_path):
    """An operator watching the test's namespace (with the claims the base training uses)."""
    create_pvcs(kube, "corpus", "ckpt", "models")
    op = OperatorProcess(kube.kubeconfig, [kube.namespace], tmp_path / "operator.log").start()
    try:
        yield op
    finally:
        op.stop()
        sys.stdout.write(f"\n--- operator log ({kube.namespace}) ---\n{op.log()[-6000:]}\n")
