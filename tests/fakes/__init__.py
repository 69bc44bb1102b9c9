"""Test doubles that speak real protocols (HTTP, Kubernetes API) on loopback ports."""
