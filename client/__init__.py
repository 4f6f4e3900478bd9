"""Light client for the chest X-ray super-resolution service (no torch)."""
