"""Federated data-sharing connector: answer peers' queries only where a signed policy allows."""

__version__ = "0.1.0"
