//! The statements that record key names in `public.distlock_names` and read them back: each
//! name travels as a bound parameter, never in a statement's text.

/// Creates the names table if it is missing: one row per id and name (two names that hash to one
/// id are two rows), and an index on the id's fold, the first int of a semaphore's slots
/// ([`crate::LockKey::permit_slot`]), which is how `distlock locks` names them.
pub(crate) const CREATE_NAMES: &str = "/*NO LOAD BALANCE*/ \
     CREATE TABLE IF NOT EXISTS public.distlock_names \
     (id int8 NOT NULL, name text NOT NULL, PRIMARY KEY (id, name)); \
     CREATE INDEX IF NOT EXISTS distlock_names_fold \
     ON public.distlock_names ((((id >> 32) # id) & 4294967295))";

/// Writes the names `$2` of the ids `$1`, keeping those already there.
pub(crate) const INSERT_NAMES: &str = "/*NO LOAD BALANCE*/ INSERT INTO public.distlock_names (id, name) \
     SELECT i, n FROM ROWS FROM (pg_catalog.unnest($1::int8[]), pg_catalog.unnest($2::text[])) t (i, n) \
     ON CONFLICT DO NOTHING";

/// Whether the names table is there (first statement) and this role may write it (second), as
/// row counts.
pub(crate) const PROBE_NAMES: &str = "/*NO LOAD BALANCE*/ \
     SELECT WHERE pg_catalog.to_regclass('public.distlock_names') IS NOT NULL; \
     SELECT WHERE pg_catalog.has_table_privilege(\
     pg_catalog.to_regclass('public.distlock_names'), 'INSERT')";

/// The names recorded for the rows `filter` selects (built here from integers only).
pub(crate) fn lookup(filter: &str) -> String {
    format!(
        "{}SELECT name FROM public.distlock_names WHERE {filter} ORDER BY name",
        crate::sql::PIN
    )
}
