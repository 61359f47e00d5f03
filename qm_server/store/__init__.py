"""Storage behind one interface (base.Store); sqlite.SqliteStore is the embedded default."""
