"""Small shared helpers with no model knowledge: dtype names, sizes, field checks, temp-then-rename writes."""
