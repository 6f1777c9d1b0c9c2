"""ForgeEval, the same shape as ``training/``: a pure planner and the kind as the runtime drives it.

ForgeEval is accepted and stored, not evaluated yet: the planner validates the spec and says so
in a condition (``Supported=False``, reason ``NotImplemented``). The evaluator itself will add
observe/children/status modules here, as ``training/`` has.
"""
