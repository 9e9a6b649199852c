"""The consent document: its model, its verifier, and what narrowing withdraws."""
