"""ForgeEval, the same shape as ``training/``: observe (the model's training, the Job, its pod), a pure
planner, child builders, the translation to the evaluator's configuration, the results in status."""
