"""kubectl bound to one namespace of the test cluster, with polling helpers."""

from __future__ import annotations

import json
import subprocess
import time

from devcluster import DevCluster


class Kube:
    """kubectl bound to one namespace of the test cluster."""

    def __init__(self, cluster: DevCluster, namespace: str):
        self.cluster = cluster
        self.namespace = namespace
        self.kubeconfig = cluster.state.kubeconfig

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return self.cluster.kubectl("-n", self.namespace, *args, input=input, check=check)

    def get(self, kind: str, name: str | None = None, selector: str | None = None) -> dict:
        args = ["get", kind] + ([name] if name else []) + (["-l", selector] if selector else []) + ["-o", "json"]
        return json.loads(self(*args).stdout)

    def apply(self, manifest: dict | str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self("apply", "-f", "-", *extra, input=text, check=check)

    def events(self, field_selector: str = "") -> list[dict]:
        args = ["get", "events", "-o", "json"] + (["--field-selector", field_selector] if field_selector else [])
        return json.loads(self(*args).stdout)["items"]

    def wait_for(self, what: str, predicate, timeout: float = 60.0, interval: float = 0.5):
        """Poll ``predicate()`` until it returns something truthy; return that value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
