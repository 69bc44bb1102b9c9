-- The control schema as main (77e439a) created it, verbatim: a fixture of
-- tests/test_control_schema.py, which builds it, fills it and upgrades it.
-- {schema} is filled in by psycopg.sql (an identifier).

-- State database: store._DDL with SCHEMA_VERSION 1.
CREATE SCHEMA IF NOT EXISTS {schema};
DO $$ BEGIN
  CREATE TYPE {schema}.log_level AS ENUM ('debug', 'info', 'warning', 'error', 'critical');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE TABLE IF NOT EXISTS {schema}.schema_version (
  version integer PRIMARY KEY,
  applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.releases (
  name text PRIMARY KEY,
  state text NOT NULL,
  status text NOT NULL CHECK (status IN ('running', 'promoted', 'rolled_back', 'failed')),
  config_sha256 text NOT NULL,
  config jsonb NOT NULL,
  facts jsonb NOT NULL DEFAULT '{{}}',
  owner text,
  error text,
  rollback_requested text,
  approved_stage integer,
  started_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS {schema}.release_log (
  id bigserial PRIMARY KEY,
  release text NOT NULL REFERENCES {schema}.releases(name) ON DELETE CASCADE,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  level {schema}.log_level NOT NULL DEFAULT 'info',
  state text,
  message text NOT NULL,
  details jsonb,
  duration interval
);
CREATE INDEX IF NOT EXISTS release_log_release_idx ON {schema}.release_log (release, id);
CREATE TABLE IF NOT EXISTS {schema}.stage_measurements (
  id bigserial PRIMARY KEY,
  release text NOT NULL REFERENCES {schema}.releases(name) ON DELETE CASCADE,
  stage integer NOT NULL,
  weight integer NOT NULL,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  check_name text NOT NULL,
  value double precision,
  baseline double precision,
  verdict text NOT NULL CHECK (verdict IN ('pass', 'fail', 'inconclusive')),
  detail text
);
CREATE INDEX IF NOT EXISTS stage_measurements_release_idx
  ON {schema}.stage_measurements (release, stage, id);
INSERT INTO {schema}.schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;

-- Green: migrations.TRACKING_DDL, the heartbeat, the provision marker, the copy's
-- state, deferred and settings tables.
CREATE SCHEMA IF NOT EXISTS {schema};
DO $$ BEGIN
  CREATE TYPE {schema}.migration_status AS ENUM
    ('pending', 'running', 'completed', 'failed', 'rolled_back');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
  CREATE TYPE {schema}.log_level AS ENUM ('debug', 'info', 'warning', 'error', 'critical');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE TABLE IF NOT EXISTS {schema}.migrations (
  id serial PRIMARY KEY,
  migration_name text NOT NULL UNIQUE,
  version text NOT NULL,
  description text,
  sql_file text,
  checksum text NOT NULL,
  status {schema}.migration_status NOT NULL DEFAULT 'pending',
  applied_at timestamptz,
  applied_by text,
  execution_time interval,
  rollback_sql text,
  release text,
  error text
);
CREATE TABLE IF NOT EXISTS {schema}.migration_log (
  id bigserial PRIMARY KEY,
  migration_id integer REFERENCES {schema}.migrations(id) ON DELETE CASCADE,
  log_level {schema}.log_level NOT NULL DEFAULT 'info',
  message text NOT NULL,
  timestamp timestamptz NOT NULL DEFAULT clock_timestamp(),
  execution_time interval,
  error_details jsonb
);
CREATE TABLE IF NOT EXISTS {schema}.provisioned (release text PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {schema}.heartbeat (direction text PRIMARY KEY,
  beat bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS {schema}.initial_copy (slot text PRIMARY KEY, phase text NOT NULL,
  consistent_point text, jobs int, started_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {schema}.initial_copy_deferred (
  id bigserial PRIMARY KEY, step int NOT NULL, kind text NOT NULL,
  schema_name text NOT NULL, table_name text NOT NULL, object_name text NOT NULL,
  statements text[] NOT NULL, validate boolean NOT NULL DEFAULT false,
  ref_schema text, ref_table text,
  UNIQUE (kind, schema_name, table_name, object_name));
CREATE TABLE IF NOT EXISTS {schema}.initial_copy_settings (name text PRIMARY KEY,
  previous text);
