-- The hot-path functions with fewer statements per call (issue 6): same arguments, same results,
-- same locks in the same order (see 0002). What changed, and why it is safe:
--
-- * The user's requests-per-minute limit comes with the user's state (kb_user_state_rpm), so a
--   user without a rate limit costs no rate-limit statement at all, and one with a limit costs one
--   upsert instead of a lookup plus an upsert.
-- * A period whose reserved_usd is 0 has no open reservations (reserved_usd is the sum of the
--   period's open reservations, kept in the same transactions that add and remove them). Then
--   there is nothing expired to sweep or subtract: kb_record_usage and kb_check_limit skip
--   kb_release_expired, and kb_period_totals skips its reservations subquery.
-- * kb_audit locks the chain head first and inserts it only for a user's first audit row, instead
--   of attempting the insert on every call.
-- * Threshold alerts are counted in PL/pgSQL instead of a query over unnest().
-- * A user's expired reservations are found by index (user_id, expire_time) instead of reading
--   all of that user's open reservations.
-- * kb_user_state and kb_lock_period keep their signatures but are now defined by the new
--   kb_user_state_rpm and kb_lock_period_row (one definition each); kb_take_rate_slot, no longer
--   called, is dropped.
-- * On Supabase, the new functions are restricted as 0006 restricted the old ones, by a function
--   that later migrations adding kb_* functions call again (kb_restrict_internal_functions).

CREATE INDEX reservations_user_expiry ON reservations (user_id, expire_time);

-- A user's limit, key state and requests-per-minute limit (NULL = none). limit NULL = unlimited.
CREATE FUNCTION kb_user_state_rpm(p_user text)
RETURNS TABLE (limit_usd numeric, disabled boolean, key_status text, key_version bigint,
               rpm integer)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(u.custom_limit_usd, t.monthly_limit_usd), u.disabled, k.status, k.key_version,
           coalesce(u.custom_requests_per_minute, t.requests_per_minute)
    FROM users u
    JOIN tiers t ON t.name = u.tier
    JOIN api_keys k ON k.user_id = u.user_id AND k.key_version = u.current_key_version
    WHERE u.user_id = p_user;
$$;

CREATE OR REPLACE FUNCTION kb_user_state(p_user text)
RETURNS TABLE (limit_usd numeric, disabled boolean, key_status text, key_version bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.limit_usd, s.disabled, s.key_status, s.key_version FROM kb_user_state_rpm(p_user) s;
$$;

-- Count one call against a known limit of p_rpm calls per minute; false when it is used up.
CREATE FUNCTION kb_count_rate_slot(p_user text, p_now timestamptz, p_rpm integer) RETURNS boolean
LANGUAGE sql AS $$
    INSERT INTO rate_windows AS w (user_id, window_start, count)
    VALUES (p_user, date_trunc('minute', p_now), 1)
    ON CONFLICT (user_id, window_start) DO UPDATE SET count = w.count + 1
    RETURNING w.count <= p_rpm;
$$;

DROP FUNCTION kb_take_rate_slot(text, timestamptz);

-- kb_lock_period, also returning what the locked row holds.
CREATE FUNCTION kb_lock_period_row(p_user text, p_period date, OUT spent_usd numeric,
                                   OUT reserved_usd numeric)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT p.spent_usd, p.reserved_usd INTO spent_usd, reserved_usd
    FROM usage_periods p WHERE p.user_id = p_user AND p.period_start = p_period FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO usage_periods (user_id, period_start) VALUES (p_user, p_period)
        ON CONFLICT DO NOTHING;
        SELECT p.spent_usd, p.reserved_usd INTO spent_usd, reserved_usd
        FROM usage_periods p WHERE p.user_id = p_user AND p.period_start = p_period FOR UPDATE;
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION kb_lock_period(p_user text, p_period date) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM kb_lock_period_row(p_user, p_period);
END;
$$;

CREATE OR REPLACE FUNCTION kb_period_totals(p_user text, p_period date, p_now timestamptz)
RETURNS TABLE (spent_usd numeric, reserved_usd numeric)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(max(p.spent_usd), 0),
           coalesce(max(p.reserved_usd), 0) - CASE
               WHEN coalesce(max(p.reserved_usd), 0) = 0 THEN 0
               ELSE coalesce((
                   SELECT sum(r.amount_usd) FROM reservations r
                   WHERE r.user_id = p_user AND r.period_start = p_period
                     AND r.expire_time <= p_now), 0)
           END
    FROM usage_periods p
    WHERE p.user_id = p_user AND p.period_start = p_period;
$$;

CREATE OR REPLACE FUNCTION kb_audit(p_user text, p_time timestamptz, p_actor text, p_action text,
                                    p_details jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_seq bigint;
    v_prev bytea;
    v_hash bytea;
BEGIN
    SELECT h.seq + 1, h.row_hash INTO v_seq, v_prev
    FROM audit_heads h WHERE h.user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN  -- the user's first audit row starts the chain
        INSERT INTO audit_heads (user_id, seq, row_hash)
        VALUES (p_user, 0, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
        ON CONFLICT DO NOTHING;
        SELECT h.seq + 1, h.row_hash INTO v_seq, v_prev
        FROM audit_heads h WHERE h.user_id = p_user FOR UPDATE;
    END IF;
    v_hash := sha256(v_prev || kb_audit_content(p_user, v_seq, p_time, p_actor, p_action, p_details));
    INSERT INTO audit_log (user_id, event_id, event_time, actor, action, details, seq, prev_hash, row_hash)
    VALUES (p_user, gen_random_uuid(), p_time, p_actor, p_action, p_details, v_seq, v_prev, v_hash);
    UPDATE audit_heads SET seq = v_seq, row_hash = v_hash WHERE user_id = p_user;
END;
$$;

CREATE OR REPLACE FUNCTION kb_get_key(p_user text, p_period date, p_now timestamptz, p_actor text,
                                      p_event_id uuid)
RETURNS TABLE (o_outcome text, o_key_id text, o_key_version bigint, o_sealed bytea, o_kek_id text,
               o_limit numeric, o_spent numeric, o_reserved numeric)
LANGUAGE plpgsql AS $$
DECLARE
    v_key_id text;
    v_version bigint;
    v_status text;
    v_sealed bytea;
    v_kek_id text;
    v_disabled boolean;
    v_limit numeric;
    v_rpm integer;
    v_spent numeric;
    v_reserved numeric;
BEGIN
    SELECT k.key_id, k.key_version, k.status, k.sealed_secret, k.kek_id, u.disabled,
           coalesce(u.custom_limit_usd, t.monthly_limit_usd),
           coalesce(u.custom_requests_per_minute, t.requests_per_minute)
    INTO v_key_id, v_version, v_status, v_sealed, v_kek_id, v_disabled, v_limit, v_rpm
    FROM users u
    JOIN tiers t ON t.name = u.tier
    JOIN api_keys k ON k.user_id = u.user_id AND k.key_version = u.current_key_version
    WHERE u.user_id = p_user;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_key', NULL::text, NULL::bigint, NULL::bytea, NULL::text,
                            NULL::numeric, NULL::numeric, NULL::numeric;
        RETURN;
    END IF;
    SELECT t.spent_usd, t.reserved_usd INTO v_spent, v_reserved
    FROM kb_period_totals(p_user, p_period, p_now) t;
    IF v_disabled OR v_status <> 'active' THEN
        RETURN QUERY SELECT 'disabled', v_key_id, v_version, NULL::bytea, NULL::text,
                            v_limit, v_spent, v_reserved;
        RETURN;
    END IF;
    IF v_limit IS NOT NULL AND v_spent >= v_limit THEN
        RETURN QUERY SELECT 'limit', v_key_id, v_version, NULL::bytea, NULL::text,
                            v_limit, v_spent, v_reserved;
        RETURN;
    END IF;
    IF v_rpm IS NOT NULL THEN
        IF NOT kb_count_rate_slot(p_user, p_now, v_rpm) THEN
            RETURN QUERY SELECT 'rate_limited', v_key_id, v_version, NULL::bytea, NULL::text,
                                v_limit, v_spent, v_reserved;
            RETURN;
        END IF;
    END IF;
    PERFORM kb_audit(p_user, p_now, p_actor, 'key.disclosed',
                     jsonb_build_object('key_id', v_key_id, 'key_version', v_version));
    RETURN QUERY SELECT 'ok', v_key_id, v_version, v_sealed, v_kek_id, v_limit, v_spent, v_reserved;
END;
$$;

CREATE OR REPLACE FUNCTION kb_check_limit(p_user text, p_estimate numeric, p_request_id text,
                                          p_new_reservation uuid, p_now timestamptz,
                                          p_period date, p_expire timestamptz)
RETURNS TABLE (o_outcome text, o_allowed boolean, o_limit numeric, o_spent numeric,
               o_reserved numeric, o_key_version bigint, o_reservation_id uuid,
               o_expire_time timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_state record;
    v_spent numeric;
    v_reserved numeric;
    v_res_id uuid;
    v_expire timestamptz;
BEGIN
    SELECT * INTO v_state FROM kb_user_state_rpm(p_user);
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_key', false, NULL::numeric, NULL::numeric, NULL::numeric,
                            NULL::bigint, NULL::uuid, NULL::timestamptz;
        RETURN;
    END IF;
    IF v_state.disabled OR v_state.key_status <> 'active' THEN
        RETURN QUERY SELECT 'disabled', false, v_state.limit_usd, NULL::numeric, NULL::numeric,
                            v_state.key_version, NULL::uuid, NULL::timestamptz;
        RETURN;
    END IF;
    IF v_state.rpm IS NOT NULL THEN
        IF NOT kb_count_rate_slot(p_user, p_now, v_state.rpm) THEN
            RETURN QUERY SELECT 'rate_limited', false, v_state.limit_usd, NULL::numeric,
                                NULL::numeric, v_state.key_version, NULL::uuid, NULL::timestamptz;
            RETURN;
        END IF;
    END IF;
    IF p_estimate IS NULL THEN
        SELECT t.spent_usd, t.reserved_usd INTO v_spent, v_reserved
        FROM kb_period_totals(p_user, p_period, p_now) t;
        RETURN QUERY SELECT 'ok', (v_state.limit_usd IS NULL OR v_spent + v_reserved < v_state.limit_usd),
                            v_state.limit_usd, v_spent, v_reserved, v_state.key_version,
                            NULL::uuid, NULL::timestamptz;
        RETURN;
    END IF;

    SELECT l.reserved_usd INTO v_reserved FROM kb_lock_period_row(p_user, p_period) l;
    IF v_reserved > 0 THEN
        PERFORM kb_release_expired(p_user, p_now);
    END IF;
    IF p_request_id IS NOT NULL THEN
        SELECT r.reservation_id, r.expire_time INTO v_res_id, v_expire
        FROM reservations r WHERE r.user_id = p_user AND r.request_id = p_request_id;
    END IF;
    v_spent := NULL;
    IF v_res_id IS NULL THEN
        UPDATE usage_periods p SET reserved_usd = p.reserved_usd + p_estimate
        WHERE p.user_id = p_user AND p.period_start = p_period
          AND (v_state.limit_usd IS NULL OR p.spent_usd + p.reserved_usd + p_estimate <= v_state.limit_usd)
        RETURNING p.spent_usd, p.reserved_usd INTO v_spent, v_reserved;
        IF FOUND THEN
            INSERT INTO reservations (user_id, reservation_id, period_start, amount_usd, request_id,
                                      create_time, expire_time)
            VALUES (p_user, p_new_reservation, p_period, p_estimate, p_request_id, p_now, p_expire);
            v_res_id := p_new_reservation;
            v_expire := p_expire;
        END IF;
    END IF;
    IF v_spent IS NULL THEN  -- refused, or answered by the request's earlier reservation
        SELECT p.spent_usd, p.reserved_usd INTO v_spent, v_reserved
        FROM usage_periods p WHERE p.user_id = p_user AND p.period_start = p_period;
    END IF;
    RETURN QUERY SELECT 'ok', v_res_id IS NOT NULL, v_state.limit_usd, v_spent, v_reserved,
                        v_state.key_version, v_res_id, v_expire;
END;
$$;

CREATE OR REPLACE FUNCTION kb_record_usage(p_user text, p_request_id text, p_reservation_id uuid,
                                           p_model text, p_agent text, p_prompt bigint,
                                           p_completion bigint, p_total bigint, p_cost numeric,
                                           p_duration_ms bigint, p_now timestamptz,
                                           p_period date, p_thresholds numeric[])
RETURNS TABLE (o_outcome text, o_duplicate boolean, o_spent numeric, o_remaining numeric,
               o_over_limit boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_state record;
    v_res_amount numeric := 0;
    v_res_period date;
    v_spent numeric;
    v_reserved numeric;
    v_remaining numeric;
    v_over boolean;
    v_level integer;
    v_new_level integer := 0;
    v_threshold numeric;
BEGIN
    SELECT * INTO v_state FROM kb_user_state(p_user);
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_key', false, NULL::numeric, NULL::numeric, false;
        RETURN;
    END IF;
    -- Holding the period lock, a concurrent duplicate of this request has either committed
    -- (and is seen below) or waits behind us.
    SELECT l.reserved_usd INTO v_reserved FROM kb_lock_period_row(p_user, p_period) l;
    RETURN QUERY SELECT 'ok', true, l.spent_after_usd, l.remaining_after_usd, l.over_limit
    FROM usage_ledger l WHERE l.user_id = p_user AND l.request_id = p_request_id;
    IF FOUND THEN
        RETURN;
    END IF;

    IF v_reserved > 0 THEN
        PERFORM kb_release_expired(p_user, p_now);
    END IF;
    IF p_reservation_id IS NOT NULL THEN
        DELETE FROM reservations r
        WHERE r.user_id = p_user AND r.reservation_id = p_reservation_id
        RETURNING r.amount_usd, r.period_start INTO v_res_amount, v_res_period;
        IF NOT FOUND THEN
            v_res_amount := 0;
        ELSIF v_res_period <> p_period THEN
            UPDATE usage_periods p SET reserved_usd = p.reserved_usd - v_res_amount
            WHERE p.user_id = p_user AND p.period_start = v_res_period;
            v_res_amount := 0;
        END IF;
    END IF;

    UPDATE usage_periods p
    SET spent_usd = p.spent_usd + p_cost,
        reserved_usd = p.reserved_usd - v_res_amount,
        request_count = p.request_count + 1
    WHERE p.user_id = p_user AND p.period_start = p_period
    RETURNING p.spent_usd, p.reserved_usd, p.alert_level INTO v_spent, v_reserved, v_level;
    v_remaining := v_state.limit_usd - v_spent - v_reserved;
    v_over := v_state.limit_usd IS NOT NULL AND v_spent >= v_state.limit_usd;

    INSERT INTO usage_ledger (user_id, request_id, period_start, record_time, key_version,
                              reservation_id, model, agent, prompt_tokens, completion_tokens,
                              total_tokens, cost_usd, duration_ms, spent_after_usd,
                              remaining_after_usd, over_limit)
    VALUES (p_user, p_request_id, p_period, p_now, v_state.key_version, p_reservation_id, p_model,
            p_agent, p_prompt, p_completion, p_total, p_cost, p_duration_ms, v_spent, v_remaining,
            v_over)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'duplicate request recorded concurrently' USING ERRCODE = 'KB409';
    END IF;

    INSERT INTO usage_daily AS d (user_id, day, model, agent, requests, prompt_tokens,
                                  completion_tokens, total_tokens, cost_usd)
    VALUES (p_user, (p_now AT TIME ZONE 'UTC')::date, p_model, p_agent, 1, p_prompt, p_completion,
            p_total, p_cost)
    ON CONFLICT (user_id, day, model, agent) DO UPDATE
    SET requests = d.requests + 1, prompt_tokens = d.prompt_tokens + p_prompt,
        completion_tokens = d.completion_tokens + p_completion,
        total_tokens = d.total_tokens + p_total, cost_usd = d.cost_usd + p_cost;
    INSERT INTO usage_hourly AS h (user_id, hour, requests, cost_usd)
    VALUES (p_user, date_trunc('hour', p_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', 1, p_cost)
    ON CONFLICT (user_id, hour) DO UPDATE
    SET requests = h.requests + 1, cost_usd = h.cost_usd + p_cost;

    -- Threshold alerts: exactly once per (user, month, threshold), in this transaction.
    IF v_state.limit_usd IS NOT NULL AND v_state.limit_usd > 0 THEN
        FOREACH v_threshold IN ARRAY coalesce(p_thresholds, '{}') LOOP
            IF v_spent >= v_state.limit_usd * v_threshold / 100 THEN
                v_new_level := v_new_level + 1;
            END IF;
        END LOOP;
        IF v_new_level > v_level THEN
            INSERT INTO alerts (user_id, alert_id, kind, period_start, dedup_key, threshold_percent,
                                spent_usd, reference_usd, create_time, next_attempt_time)
            SELECT p_user, gen_random_uuid(), 'THRESHOLD', p_period, 'threshold:' || t::text,
                   t::integer, v_spent, v_state.limit_usd, p_now, p_now
            FROM unnest(p_thresholds) t
            WHERE v_spent >= v_state.limit_usd * t / 100
            ON CONFLICT DO NOTHING;
            UPDATE usage_periods p SET alert_level = v_new_level
            WHERE p.user_id = p_user AND p.period_start = p_period;
        END IF;
    END IF;
    RETURN QUERY SELECT 'ok', false, v_spent, v_remaining, v_over;
END;
$$;

-- Supabase grants EXECUTE on every new function to anon and authenticated by default, and PostgREST
-- exposes what they may execute. 0006 took that away from the kb_* functions of its time; this
-- does it for all kb_* functions, now and whenever a later migration that adds some calls it.
CREATE FUNCTION kb_restrict_internal_functions() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
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
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'kb\_%'
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', v_function, v_others);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', v_function);
    END LOOP;
END;
$$;

SELECT kb_restrict_internal_functions();
