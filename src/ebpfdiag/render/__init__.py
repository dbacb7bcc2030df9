"""Everything that prints: terminal views and JSON writers."""
