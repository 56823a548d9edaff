"""evoforge: dashboards."""
