"""evoforge: search_spaces."""
