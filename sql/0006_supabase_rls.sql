-- Row-level security, applied only when this database is a Supabase database: schema auth with
-- function auth.uid(), and roles authenticated and service_role. Anywhere else (the embedded
-- server, plain PostgreSQL) this migration does nothing.
--
-- Who may read what, once applied:
--   authenticated    a signed-in user reads only rows whose user_id = auth.uid()::text, and the
--                    tiers; never caller_tokens, leases or schema_migrations; writes nothing.
--   keybroker_admin  (created here if missing, NOLOGIN; grant it to back-office roles) reads
--                    every row of every table.
--   service_role     manages everything (ALL), by policy as well as by its BYPASSRLS.
--   anon             nothing.
-- No role but the owner and service_role can read api_keys.sealed_secret, api_keys.kek_id or
-- caller_tokens.secret_hash: the others get column-level grants that leave those columns out
-- (so "SELECT * FROM api_keys" is refused; name the columns, or call get_user_api_key()).
--
-- The broker's own connection role owns these tables (it ran the migrations). FORCE ROW LEVEL
-- SECURITY is deliberately not used, so the owner bypasses row-level security and the broker
-- works exactly as before.
--
-- Tables added by later migrations must get the same treatment in their own migration
-- (tests/test_supabase_rls.py checks every table).
DO $rls$
DECLARE
    -- Tables keyed by user_id: each user reads their own rows.
    v_user_tables constant text[] := ARRAY[
        'users', 'api_keys', 'usage_periods', 'reservations', 'usage_ledger', 'usage_daily',
        'usage_hourly', 'alerts', 'alert_deliveries', 'audit_log', 'audit_heads', 'key_intents',
        'key_events', 'key_invalid_reports', 'rate_windows'];
    -- Tables about no user: admin and service_role only (tiers also readable when signed in).
    v_other_tables constant text[] := ARRAY['tiers', 'caller_tokens', 'leases', 'schema_migrations'];
    v_table text;
    v_hidden text[];
    v_columns text;
    v_function regprocedure;
    v_others text := 'PUBLIC, authenticated';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                   WHERE n.nspname = 'auth' AND p.proname = 'uid' AND p.pronargs = 0)
       OR to_regrole('authenticated') IS NULL OR to_regrole('service_role') IS NULL THEN
        RETURN;  -- not a Supabase database
    END IF;
    IF to_regrole('anon') IS NOT NULL THEN
        v_others := v_others || ', anon';
    END IF;

    IF to_regrole('keybroker_admin') IS NULL THEN
        BEGIN
            CREATE ROLE keybroker_admin NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- roles are cluster-wide: another database's migration created it just now
        END;
    END IF;

    FOREACH v_table IN ARRAY v_user_tables || v_other_tables LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', v_table);
        -- Supabase's default privileges gave anon and authenticated ALL on every new table.
        EXECUTE format('REVOKE ALL ON TABLE %I FROM %s', v_table, v_others);
        EXECUTE format('GRANT ALL ON TABLE %I TO service_role', v_table);
        EXECUTE format('CREATE POLICY kb_service_role_all ON %I FOR ALL TO service_role '
                       'USING (true) WITH CHECK (true)', v_table);

        v_hidden := CASE v_table
                        WHEN 'api_keys' THEN ARRAY['sealed_secret', 'kek_id']
                        WHEN 'caller_tokens' THEN ARRAY['secret_hash']
                        ELSE ARRAY[]::text[]
                    END;
        SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO v_columns
        FROM pg_attribute a
        WHERE a.attrelid = v_table::regclass AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname <> ALL (v_hidden);

        EXECUTE format('GRANT SELECT (%s) ON TABLE %I TO keybroker_admin', v_columns, v_table);
        EXECUTE format('CREATE POLICY kb_admin_read ON %I FOR SELECT TO keybroker_admin '
                       'USING (true)', v_table);

        IF v_table = ANY (v_user_tables) THEN
            EXECUTE format('GRANT SELECT (%s) ON TABLE %I TO authenticated', v_columns, v_table);
            -- (SELECT auth.uid()) is evaluated once per statement, not once per row.
            EXECUTE format('CREATE POLICY kb_own_rows ON %I FOR SELECT TO authenticated '
                           'USING (user_id = (SELECT auth.uid())::text)', v_table);
        ELSIF v_table = 'tiers' THEN
            EXECUTE format('GRANT SELECT (%s) ON TABLE %I TO authenticated', v_columns, v_table);
            EXECUTE format('CREATE POLICY kb_read ON %I FOR SELECT TO authenticated USING (true)',
                           v_table);
        END IF;
    END LOOP;

    -- The broker's internal functions (kb_*) are exposed by PostgREST to whoever may execute
    -- them; only the owner and service_role need them.
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'kb\_%'
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', v_function, v_others);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', v_function);
    END LOOP;

    -- Seed functions (0005): the readers run with the caller's rights, so row-level security
    -- limits a signed-in user to their own rows; resetting is for service_role.
    FOREACH v_function IN ARRAY ARRAY['get_user_api_key(text)', 'check_usage_limit(text)',
                                      'get_user_usage_summary(text, date)']::regprocedure[] LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', v_function, v_others);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO authenticated, keybroker_admin, service_role',
                       v_function);
    END LOOP;
    REVOKE EXECUTE ON FUNCTION reset_monthly_usage() FROM PUBLIC, authenticated;
    IF to_regrole('anon') IS NOT NULL THEN
        REVOKE EXECUTE ON FUNCTION reset_monthly_usage() FROM anon;
    END IF;
    GRANT EXECUTE ON FUNCTION reset_monthly_usage() TO service_role;
END;
$rls$;
