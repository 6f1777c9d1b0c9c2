"""Fixtures of the chart tests: a real helm binary, rendering, and installs into the test control plane."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest
import yaml

from helmbin import helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "forge"


class Helm:
    """helm with its own config/cache/data folders: nothing read from or written to the user's."""

    def __init__(self, home: Path, kubeconfig: str | None = None):
        self.binary = str(helm_binary())
        self.home = home
        self.kubeconfig = kubeconfig
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
        self._files = itertools.count()

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.binary, *args] + (["--kubeconfig", self.kubeconfig] if self.kubeconfig else [])
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def values_file(self, values: dict | None) -> str:
        path = self.home / f"values-{next(self._files)}.yaml"
        path.write_text(yaml.safe_dump(values or {}))
        return str(path)

    def template(self, values: dict | None = None, release: str = "forge",
                 namespace: str = "forge-system") -> list[dict]:
        """The manifests the chart renders (without crds/)."""
        out = self("template", release, str(CHART), "--namespace", namespace, "--values", self.values_file(values))
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def template_error(self, values: dict) -> str:
        """Why the chart refuses these values (fails the test if it renders them)."""
        out = self("template", "forge", str(CHART), "--values", self.values_file(values), check=False)
        assert out.returncode != 0, f"the chart rendered {values}"
        return out.stderr


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    """A real helm (v4, built from its Go module by scripts/helm-build). If it cannot be built, every chart test
    errors."""
    return Helm(tmp_path_factory.mktemp("helm-home"))
