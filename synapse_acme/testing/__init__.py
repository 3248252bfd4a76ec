"""Test doubles and a real test CA, shipped with the package for tests of code built on it.

``acme_server``: an in-memory RFC 8555 CA with ARI and profiles; ``pebble``: runs Debian's Pebble
test CA (``python -m synapse_acme.testing.pebble serve``, what scripts/demo.sh starts); ``store``
and ``issuer``: in-memory fakes; ``certificates``: throw-away CA certificates.
"""
