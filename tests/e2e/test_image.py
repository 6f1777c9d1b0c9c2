"""The images built without Docker hold what their Dockerfiles describe: the trainer image
trainer-image/Dockerfile's, the operator image the root Dockerfile's."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT
import pytest

from images import (DockerfileSpec, image_config, installed_distributions, normalise, operator_image, operator_spec,
                    requirements)


def _pins(requirements: str) -> dict[str, str]:
    return {normalise(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", requirements, re.M)}


def test_installed_packages_are_the_dockerfiles_trainer_extra_on_its_base_torch(image):
    spec = DockerfileSpec.parse()
    installed = installed_distributions(image)
    # torch at the Dockerfile's base image version, the rest of `pip install ".[trainer]"` as pinned
    assert installed["torch"].split("+")[0] == spec.torch_version
    expected = _pins(requirements(spec)) | {"forge": "0.1.0"}
    pip = {k: v for k, v in installed.items() if k == "pip"}
    assert {k: v for k, v in installed.items() if k != "pip"} == expected
    assert pip, "pip is missing from the image (python:3.11-slim and the pytorch images have it)"
    # every direct requirement of the extra is there
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][spec.extra]
    for requirement in extra:
        assert normalise(re.split(r"[<>=!~\[ ;]", requirement)[0]) in installed, requirement


def test_image_config_is_the_dockerfiles(image):
    spec = DockerfileSpec.parse()
    config = image_config(image)["config"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert {k: env.get(k) for k in spec.env} == spec.env
    assert (config["User"], config["WorkingDir"]) == (spec.user, spec.workdir) == ("10001:10001", "/home/forge")
    assert (config["Entrypoint"], config["Cmd"]) == (spec.entrypoint, spec.cmd)
    assert spec.directories == ["/checkpoints", "/output", "/cache"]


@pytest.fixture(scope="module")
def operator():
    return operator_image()


def test_the_operator_image_holds_the_operator_extra_pinned_by_the_dev_lock_and_no_torch(operator):
    spec = operator_spec()
    # pip as the base image has it (python:3.12-slim, and `python -m venv` adds its own)
    installed = {k: v for k, v in installed_distributions(operator).items() if k != "pip"}
    assert spec.extra == "operator" and spec.constraints == "requirements/dev.lock" and spec.venv == "/opt/forge"
    assert installed == _pins(requirements(spec)) | {"forge": "0.1.0"}
    assert "torch" not in installed


def test_the_operator_image_config_is_the_dockerfiles(operator):
    config = image_config(operator)["config"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/forge/bin:/usr/local/bin:")  # ENV PATH=/opt/forge/bin:$PATH
    assert (config["User"], config["Entrypoint"]) == ("10001:10001", ["forge", "operator"])
    assert {k: env[k] for k in ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")} == {"PYTHONUNBUFFERED": "1",
                                                                                   "PYTHONDONTWRITEBYTECODE": "1"}
