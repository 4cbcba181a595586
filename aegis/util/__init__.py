"""Small shared helpers: atomic files, process groups, tables."""
