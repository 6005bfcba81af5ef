"""The training orchestrator, its configuration, plan executor, schedules and run records."""
