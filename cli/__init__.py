"""The `aisp` command."""
