"""orchestrate: blue-green and canary releases of PostgreSQL-backed services."""

__version__ = "0.1.0"
