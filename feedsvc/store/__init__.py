"""Store port and its implementations (Cassandra, embedded SQLite)."""
