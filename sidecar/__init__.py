"""Aforo gateway sidecar: per-request quota and wallet decisions for API gateways."""

__version__ = "0.1.0"
