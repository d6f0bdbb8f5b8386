"""memory subsystem of the engine."""
