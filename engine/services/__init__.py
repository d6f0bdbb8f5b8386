"""The engine's services, one per workbench concern (memory, chat, jobs).

Each service gets what it needs from :class:`engine.runtime.Runtime` (pools, loaded models)
and from explicit callbacks wired in :mod:`engine.facade`, never from another service's
private state. Importing a service is cheap: torch, transformers and SQLAlchemy load on use.
"""
