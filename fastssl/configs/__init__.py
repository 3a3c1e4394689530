"""Shipped training recipes (YAML), loaded by name with ``fastssl train --config NAME``."""
