"""What an operator runs besides the CLI commands: the fleet supervisor, the demo, dead letters, health."""
