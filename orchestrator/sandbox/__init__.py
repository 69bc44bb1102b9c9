"""A local sandbox: PostgreSQL clusters, HAProxy and Prometheus on free ports.

Used by the embedded demo (``python -m orchestrator.sandbox.demo``) and by the
integration tests. Everything listens on 127.0.0.1 only and lives under one base
directory, so a run leaves nothing behind once stopped.
"""
