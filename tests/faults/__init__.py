"""Faults on real paths for the tests: a frozen cluster, a proxy that blackholes."""
