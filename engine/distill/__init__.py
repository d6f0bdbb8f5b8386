"""distill subsystem of the engine."""
