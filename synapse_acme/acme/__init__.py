"""The ACME protocol layer: RFC 8555 over Twisted, usable without the rest of synapse-acme.

- :mod:`~synapse_acme.acme.transport`: signed requests (JWS), the nonce pool, retries, problem
  documents, the request cap;
- :mod:`~synapse_acme.acme.client`: the RFC 8555 resources (directory, account, order,
  authorization, challenge, finalize, certificate, renewal information);
- :mod:`~synapse_acme.acme.issuer`: one whole issuance (an ``IIssuer``);
- :mod:`~synapse_acme.acme.trust`: the check that an issued chain reaches a trusted root;
- :mod:`~synapse_acme.acme.csr` and :mod:`~synapse_acme.acme.ari`: the CSR and the RFC 9773 CertID.
- :mod:`~synapse_acme.acme.tlsalpn`: the RFC 8737 ``tls-alpn-01`` challenge and its validation
  certificate.

It depends only on the base modules below it (errors, model, names, crypto, interfaces,
policy, fsutil), never on the service, the store, the listeners, the config or the CLI; a unit
test (``tests/unit/test_layers.py``) keeps it so.
"""
