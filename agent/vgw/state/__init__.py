"""The agent's state on disk: the encrypted outbox, the audit log, keys and credentials, the consent cache and the
manager that applies consent."""
