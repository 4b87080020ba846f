"""mailwarden: a campus email security gateway with a compliance registry.

Public names: ``__version__``.
Security: none (package marker).
"""

__version__ = "0.1.0"
