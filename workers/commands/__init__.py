"""The ``zandd`` subcommands, one module per area; each has ``register(tree)``."""
