"""Subcommands of the ``mindset`` CLI.

Each module here exposes ``register(subparsers)``, which adds its parser and sets
``handler`` to a function taking the parsed arguments and returning an exit status.
Modules import their heavy dependencies inside the handler, so ``--help`` stays fast.
"""

# Order is the order in `mindset --help`.
COMMAND_MODULES = [
    "mindset.commands.eval_cmd",
    "mindset.commands.augment_cmd",
    "mindset.commands.distill_cmd",
    "mindset.commands.serve_cmd",
    "mindset.commands.logs_cmd",
    "mindset.commands.complete_cmd",
    "mindset.commands.chat_cmd",
    "mindset.commands.memory_cmd",
    "mindset.commands.model_cmd",
]
