"""Runtimes for exported DyVTE models: the orchestrator and its backends (torch reference, ...)."""
