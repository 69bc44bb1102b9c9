DROP INDEX IF EXISTS public.orders_created_at_idx;
