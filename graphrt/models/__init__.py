"""Model math (pure functions)."""
