"""Prefect flows: ``ready`` stages a module's inputs, ``done`` commits its outputs."""
