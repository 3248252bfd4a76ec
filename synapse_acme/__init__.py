"""synapse-acme: automatic TLS certificates for Matrix homeservers.

The package's modules each have one job; see ``docs/how-it-works.md`` for the data path.
"""

__version__ = "0.1.0.dev0"
