"""PostgreSQL steps of a release: each module one job, each step idempotent."""
