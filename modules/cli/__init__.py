"""The headless command line (``python -m modules.cli``)."""
