"""Cryptography, never hand-rolled: HPKE envelopes (envelope.py), per-grant data keys wrapped by the
device storage key (keys.py), and ES256 receipts (receipts.py). All primitives come from `cryptography`
and PyJWT."""
