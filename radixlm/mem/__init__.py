"""mem package."""
