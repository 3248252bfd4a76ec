"""``python -m synapse_acme`` runs the command line."""

from synapse_acme.cli import entry

entry()
