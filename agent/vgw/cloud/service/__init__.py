"""The owner's consent service behind ``vgw cloud serve`` (README "The owner's consent service",
docs/consent-service.md): an OAuth 2.0 authorization server (RFC 6749 authorization code grant, PKCE ``S256``
required as RFC 7636 and RFC 9700 ask, metadata per RFC 8414) whose consent page turns an owner's Allow into
a grant of the signed consent document the car enforces, and whose owner page withdraws it and shows the car's
erasure receipt.

- :mod:`vgw.cloud.service.config`: the ``[service]`` and ``[broker]`` TOML file;
- :mod:`vgw.cloud.service.passwords`: scrypt password hashes;
- :mod:`vgw.cloud.service.store`: the database (SQLite; the SQL is plain enough for PostgreSQL);
- :mod:`vgw.cloud.service.documents`: signs each device's next consent document, checks it with the car's
  verifier, pushes it (retried until the broker acknowledges) and hears receipts;
- :mod:`vgw.cloud.service.oauth`: Authlib's authorization server over the store;
- :mod:`vgw.cloud.service.web`: the Flask application (sign-in, consent, owner's page, token, metadata);
- :mod:`vgw.cloud.service.pages`: the server-rendered HTML.

Layer: service (README "Layout"): above the cloud kit, whose signing, push and receipt code it reuses.
"""
