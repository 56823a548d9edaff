"""evoforge: fitness."""
