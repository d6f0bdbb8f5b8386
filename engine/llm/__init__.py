"""llm subsystem of the engine."""
