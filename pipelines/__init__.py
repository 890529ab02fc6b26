"""Ray Train / Ray Data wiring around the ``allcore`` domain library."""
