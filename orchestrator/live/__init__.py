"""The live terminal view of a release (``orchestrate release``, ``status --watch``)."""

from orchestrator.live.view import LiveView, make_display, sinks_for, watch

__all__ = ["LiveView", "make_display", "sinks_for", "watch"]
