"""model subsystem of the engine."""
