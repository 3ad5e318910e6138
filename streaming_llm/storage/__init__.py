"""Storage on SQLite or PostgreSQL: the models, the query layer, the database handle (one writer
queue) and the Alembic migrations shipped in this package."""
