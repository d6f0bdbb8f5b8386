"""Modal screens of the workbench: help, entry editing, quick start."""
