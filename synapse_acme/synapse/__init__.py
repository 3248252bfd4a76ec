"""synapse-acme as a Synapse module: ``modules: [{module: synapse_acme.synapse.AcmeModule}]``.

Only this package imports Synapse, and only :mod:`synapse_acme.synapse.glue` touches its
internals.
"""

from synapse_acme.synapse.module import AcmeModule

__all__ = ["AcmeModule"]
