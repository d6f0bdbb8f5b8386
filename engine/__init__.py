"""Mindset's headless engine: models, memory store, distillation, LLM adapters, agent.

Nothing under this package may import Textual; the workbench (``mindset``) sits on top.
"""

__version__ = "0.1.0"
