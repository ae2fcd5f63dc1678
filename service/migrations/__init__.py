"""Alembic migrations of the service database (shipped in the package so an installed service can migrate)."""
