"""The `forge` command: `forge operator`, `forge train FILE`, `forge status`."""

from .main import main

__all__ = ["main"]
