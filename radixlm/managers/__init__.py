"""managers package."""
