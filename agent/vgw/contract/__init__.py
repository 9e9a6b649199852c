"""The device contract, pure (no network, threads or databases): what the agent, the cloud kit and the simulators all
speak (README "The contract, in our words")."""
