"""Backends: small classes that run the graphs of one model; the orchestrator drives them."""
