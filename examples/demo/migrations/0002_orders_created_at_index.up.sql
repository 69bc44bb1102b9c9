-- Plain CREATE INDEX, not CONCURRENTLY: the orchestrator runs each migration inside a
-- transaction, and CONCURRENTLY cannot run in one. It runs on the green database
-- before green takes traffic, so its lock only makes replication apply wait briefly.
CREATE INDEX IF NOT EXISTS orders_created_at_idx
    ON public.orders (created_at);
