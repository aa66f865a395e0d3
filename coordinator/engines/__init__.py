"""The database engines the coordinator runs on: SQLite (embedded, one process; in
`coordinator.db`) and PostgreSQL (several replicas; `postgres`), and the SQL rewrite
between them (`dialect`). Rooms write SQLite's SQL and never import from here."""
