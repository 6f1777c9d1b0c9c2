"""What every training method needs from its surroundings: the process group, SIGTERM, checkpoints,
progress reports, the budget and schedule, the export and its provenance."""
