"""citynode: signed, federated, append-only data feeds for partner cities.

The protocol core is in :mod:`citynode.core` (pure, no I/O). The node, its storage and
its HTTPS transport are built around it; :mod:`citynode.cli` is the command line.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
