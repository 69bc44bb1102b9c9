-- Orders get a lifecycle status. The green app writes it; the blue app does not know
-- the column, so it has a default: rows blue inserts (and rows replicated from blue,
-- which lack the column) become 'new'. A constant default is metadata-only since
-- PostgreSQL 11, so the table is not rewritten.
ALTER TABLE public.orders
    ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT 'new';

-- ADD CONSTRAINT has no IF NOT EXISTS; dropping first keeps a re-run harmless.
ALTER TABLE public.orders
    DROP CONSTRAINT IF EXISTS orders_status_check;
ALTER TABLE public.orders
    ADD CONSTRAINT orders_status_check
    CHECK (status IN ('new', 'paid', 'shipped', 'cancelled'));
