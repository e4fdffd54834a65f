"""Queue port and its implementations (Redis Streams, embedded SQLite)."""
