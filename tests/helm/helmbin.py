"""The `helm` binary of the chart tests, the install guide and the e2e install test: built from its
Go module (tests/helm/helm-go) by scripts/helm-build and cached in ~/.cache/forge/helm/<version>/,
like the control plane. A failed build is an error, never a skip.

    .venv/bin/python tests/helm/helmbin.py     # prints the path of helm
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def helm_binary() -> Path:
    """Path of an executable helm; builds it on first use (about 5 CPU-minutes cold)."""
    out = subprocess.run([str(ROOT / "scripts" / "helm-build")], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/helm-build failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(helm_binary())
