"""agent subsystem of the engine."""
