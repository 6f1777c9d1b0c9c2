"""The package layers hold: the operator's layers and independent kinds, pure API/planners, no torch in the
operator, no kopf in the trainer, the trainer's layers and a loop that knows no method."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts():
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"{len(contracts)} kept, 0 broken" in out.stdout  # every contract in pyproject.toml was checked


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_operator_process_loads_no_torch():
    mods = _modules_after("import forge_operator.kopf_app, forge_operator.cli.runner, forge_operator.cli")
    assert "kopf" in mods and "forge_trainer.config" in mods
    assert not {"torch", "transformers", "accelerate"} & mods


def test_trainer_process_loads_no_kopf():
    mods = _modules_after("import forge_trainer.train, forge_trainer.__main__")
    assert "torch" in mods
    assert not {m for m in mods if m == "kopf" or m.startswith("forge_operator")}


def test_what_the_operator_imports_from_the_trainer_loads_no_torch():
    mods = _modules_after("import forge_trainer.contract, forge_trainer.config")
    assert "pydantic" in mods and not {"torch", "transformers", "numpy"} & mods


def test_planners_fit_on_a_screen_and_the_loop_stays_short():
    """scripts/longest-functions fails when a watched planner or the training loop outgrows its limit."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "longest-functions")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "plan_training" in out.stdout and " run" in out.stdout
