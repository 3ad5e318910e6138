"""SQLite storage: SQLAlchemy models, the database handle and thin repositories."""
