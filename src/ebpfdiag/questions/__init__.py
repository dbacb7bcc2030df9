"""Questions asked of traced flows: evidence rules and verdict records, no matching."""
