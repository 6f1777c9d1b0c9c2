"""Talking to Kubernetes, for any kind: clients, object types, conditions and the reconciler runtime.

Nothing here knows what a ForgeTraining is. ``objects`` and ``conditions`` are pure (no
kubernetes client) so that the planners can use them; ``clients``, ``peering`` and ``runtime``
do the I/O.
"""
