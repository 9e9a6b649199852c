"""The base layer: errors, file-system helpers, time text, logging, the agent's configuration file."""
