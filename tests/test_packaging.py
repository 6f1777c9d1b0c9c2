"""The lock files agree with pyproject.toml: the floor lock holds the oldest torch the trainer
claims to support, and differs from the dev lock only in torch and what torch pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_PINNED = re.compile(r"^(torch$|triton|nvidia-|cuda-|setuptools)")  # torch, not torchao


def _pins(lock: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def _torch_floor() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["optional-dependencies"]["trainer"] if re.match(r"torch\b", d)]
    return re.fullmatch(r"torch>=(\d+\.\d+)", spec).group(1)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"[\d.]+", version).group(0).rstrip(".").split("."))


def test_the_floor_lock_pins_the_oldest_supported_torch():
    floor = _torch_floor()
    assert _pins("torch-floor.lock")["torch"] == f"{floor}.0"
    assert _release(_pins("dev.lock")["torch"]) > _release(f"{floor}.0")


def test_the_floor_lock_differs_from_the_dev_lock_only_in_torch():
    dev, floor = _pins("dev.lock"), _pins("torch-floor.lock")
    assert "transformers" in dev and "accelerate" in dev
    differ = {name for name in dev.keys() | floor.keys() if dev.get(name) != floor.get(name)}
    assert differ and all(TORCH_PINNED.match(name) for name in differ), differ
