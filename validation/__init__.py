"""Validation of models fitted with DyVTE: accuracy under each exit policy (more to come)."""
