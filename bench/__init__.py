"""diffstack GPU benchmark harness (see bench/README.md)."""
