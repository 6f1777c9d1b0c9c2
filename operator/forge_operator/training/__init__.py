"""ForgeTraining: observe -> plan -> act, split by concern.

observe    the training's Jobs, Pods and Nodes, and the current attempt
planner    plan_training: the order of the decisions (pure, one screen)
failure    why a group failed; restart it (backoff) or give up
budget     training.budget.deadline and maxGpuHours; GPU-hour accounting
lifecycle  phases, suspend and Kueue, starting and stopping workers, Invalid
status     progress, checkpoint, nodes, Stalled
children   the child objects (ConfigMap, Service, RBAC, the Job)
translate  spec -> the trainer's configuration (also used by `forge train`)
reconciler the kind as the runtime drives it; metrics mirrors the status

Nothing here imports kopf or the kubernetes client: the runtime (``k8s/``) does the I/O.
"""
