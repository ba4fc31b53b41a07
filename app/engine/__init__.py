"""The search engine: encoder, index files, snapshots, the writer. No HTTP here."""
