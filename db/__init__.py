"""SQL audit trail: schema (models), sessions and Alembic migrations."""
