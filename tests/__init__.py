"""The test suite. Its helper modules are imported as `tests.<module>` (run from the repo root)."""
