"""The agent's configuration file (README "Configuration (TOML)"): :mod:`vgw.config.settings` reads it into frozen
dataclasses. Above the contract, because some of its defaults are the contract's (the replay window)."""
