"""SQLite storage: collections, documents, chunks and the index generation."""
