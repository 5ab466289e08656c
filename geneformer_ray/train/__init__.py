"""Training: per-worker loops, their drivers, schedules and checkpoint state."""
