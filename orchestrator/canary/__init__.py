"""Canary analysis: metric checks evaluated against Prometheus during each stage."""
