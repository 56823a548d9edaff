"""evoforge: evolve."""
