"""The training orchestrator, its configuration, plan executor, schedules and the run folder."""
