"""The trainer image built without Docker holds what trainer-image/Dockerfile describes."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT
from images import DockerfileSpec, image_config, installed_distributions, normalise, trainer_requirements


def _pins(requirements: str) -> dict[str, str]:
    return {normalise(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", requirements, re.M)}


def test_installed_packages_are_the_dockerfiles_trainer_extra_on_its_base_torch(image):
    spec = DockerfileSpec.parse()
    installed = installed_distributions(image)
    # torch at the Dockerfile's base image version, the rest of `pip install ".[trainer]"` as pinned
    assert installed["torch"].split("+")[0] == spec.torch_version
    expected = _pins(trainer_requirements(spec)) | {"forge": "0.1.0"}
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
