"""``python -m synapse_acme`` runs the command line."""

import sys

from synapse_acme.cli import main

sys.exit(main())
