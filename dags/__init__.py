"""Dask graph wiring for morphset stages (no stage logic lives here)."""
