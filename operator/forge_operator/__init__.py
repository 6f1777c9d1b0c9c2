"""Forge operator: reconciles ForgeTraining and ForgeEval resources."""
