"""Widgets of the workbench: one module per pane, plus the shared pieces."""
