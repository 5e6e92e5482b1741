#!/bin/sh
# Creates one database per service, each with two roles, the layout Bulkhead's RLS relies on:
#   bulkhead_<svc>        owns the database and its tables; migrations run as it; CREATEDB
#                         because a silo-tier tenant gets a database of its own
#                         (bulkhead_<svc>_<tenant>, created on the tenant's first request)
#   bulkhead_<svc>_app    what the service runs as: LOGIN, no BYPASSRLS, owns nothing, so row
#                         level security applies; it can reach only its own service's database
# Runs once, from /docker-entrypoint-initdb.d (the postgres image) on an empty data directory.
# Passwords: BULKHEAD_PG_OWNER_PASSWORD and BULKHEAD_PG_APP_PASSWORD (development values only).
set -eu
: "${BULKHEAD_PG_OWNER_PASSWORD:?set BULKHEAD_PG_OWNER_PASSWORD}"
: "${BULKHEAD_PG_APP_PASSWORD:?set BULKHEAD_PG_APP_PASSWORD}"

for svc in identity credentials state inference orchestrator metering; do
  owner="bulkhead_${svc}"
  app="bulkhead_${svc}_app"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
       -v owner="$owner" -v app="$app" -v db="$owner" \
       -v owner_pw="$BULKHEAD_PG_OWNER_PASSWORD" -v app_pw="$BULKHEAD_PG_APP_PASSWORD" <<'SQL'
CREATE ROLE :"owner" LOGIN CREATEDB NOSUPERUSER NOCREATEROLE NOBYPASSRLS PASSWORD :'owner_pw';
CREATE ROLE :"app" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD :'app_pw';
-- Dropping a purged silo database WITH (FORCE) ends the other replicas' (app role) and autovacuum's sessions in it.
GRANT pg_signal_backend TO :"owner";
CREATE DATABASE :"db" OWNER :"owner";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO :"app";
SQL
  # Tables are created later by the owner's migrations; default privileges hand the app role
  # row access to each of them (and nothing else: no DDL, no ownership).
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$owner" -v owner="$owner" -v app="$app" <<'SQL'
GRANT USAGE ON SCHEMA public TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" GRANT USAGE, SELECT ON SEQUENCES TO :"app";
SQL
done
