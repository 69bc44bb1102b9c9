-- Dropping the column would take its CHECK constraint with it; dropping the
-- constraint explicitly first keeps the intent readable and a re-run harmless.
ALTER TABLE public.orders
    DROP CONSTRAINT IF EXISTS orders_status_check;
ALTER TABLE public.orders
    DROP COLUMN IF EXISTS status;
