"""The evaluator: a model (an export, any Hugging Face causal LM folder) scored on the organisation's
own suites (perplexity, multiple-choice, exact-match), compared with a baseline, gated, reported.

`python -m forge_trainer.eval --config PATH` runs an EvalConfig (eval/config.py, importable without
torch: the operator and `forge eval` build it); `run.evaluate` is the same in-process.
"""
