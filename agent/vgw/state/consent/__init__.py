"""Consent: the model (model.py), the pure verifier (verifier.py), the on-disk cache and clock floor
(store.py), and the manager that applies a verified document and its revocations (manager.py)."""
