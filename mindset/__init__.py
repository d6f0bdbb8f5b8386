"""The Mindset workbench and CLI."""
