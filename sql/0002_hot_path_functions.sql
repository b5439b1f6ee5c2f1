-- The hot path as SQL functions: each RPC is one round trip to the database and one implicit
-- transaction, which also keeps it correct behind PgBouncer in transaction mode.
--
-- Lock order, everywhere, to rule out deadlocks: the user's current period row first
-- (kb_lock_period), then reservations, then other period rows.
--
-- Every function takes the clock (p_now, p_period) from the caller, so tests can move time.

-- Lock the user's counter row of a period, creating it at zero first if needed.
CREATE FUNCTION kb_lock_period(p_user text, p_period date) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM usage_periods p WHERE p.user_id = p_user AND p.period_start = p_period FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO usage_periods (user_id, period_start) VALUES (p_user, p_period)
        ON CONFLICT DO NOTHING;
        PERFORM 1 FROM usage_periods p
        WHERE p.user_id = p_user AND p.period_start = p_period FOR UPDATE;
    END IF;
END;
$$;

-- Drop a user's expired reservations and take them off their periods' reserved totals.
-- Callers hold the lock of the user's current period row.
CREATE FUNCTION kb_release_expired(p_user text, p_now timestamptz) RETURNS void
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM reservations r
        WHERE r.user_id = p_user AND r.expire_time <= p_now
        RETURNING r.period_start, r.amount_usd
    ), per_period AS (
        SELECT g.period_start, sum(g.amount_usd) AS amount FROM gone g GROUP BY g.period_start
    )
    UPDATE usage_periods p SET reserved_usd = p.reserved_usd - pp.amount
    FROM per_period pp
    WHERE p.user_id = p_user AND p.period_start = pp.period_start;
$$;

-- A user's limit and key state. limit NULL = unlimited.
CREATE FUNCTION kb_user_state(p_user text)
RETURNS TABLE (limit_usd numeric, disabled boolean, key_status text, key_version bigint)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(u.custom_limit_usd, t.monthly_limit_usd), u.disabled, k.status, k.key_version
    FROM users u
    JOIN tiers t ON t.name = u.tier
    JOIN api_keys k ON k.user_id = u.user_id AND k.key_version = u.current_key_version
    WHERE u.user_id = p_user;
$$;

-- Spend and live reservations of a period, without writing (expired reservations not counted).
CREATE FUNCTION kb_period_totals(p_user text, p_period date, p_now timestamptz)
RETURNS TABLE (spent_usd numeric, reserved_usd numeric)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(max(p.spent_usd), 0),
           coalesce(max(p.reserved_usd), 0) - coalesce((
               SELECT sum(r.amount_usd) FROM reservations r
               WHERE r.user_id = p_user AND r.period_start = p_period AND r.expire_time <= p_now), 0)
    FROM usage_periods p
    WHERE p.user_id = p_user AND p.period_start = p_period;
$$;

-- GetKey: the sealed secret for disclosure, with its audit row in the same transaction.
-- o_outcome: ok | no_key | disabled | limit.
CREATE FUNCTION kb_get_key(p_user text, p_period date, p_now timestamptz, p_actor text, p_event_id uuid)
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
    v_spent numeric;
    v_reserved numeric;
BEGIN
    SELECT k.key_id, k.key_version, k.status, k.sealed_secret, k.kek_id, u.disabled,
           coalesce(u.custom_limit_usd, t.monthly_limit_usd)
    INTO v_key_id, v_version, v_status, v_sealed, v_kek_id, v_disabled, v_limit
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
    INSERT INTO audit_log (user_id, event_id, event_time, actor, action, details)
    VALUES (p_user, p_event_id, p_now, p_actor, 'key.disclosed',
            jsonb_build_object('key_id', v_key_id, 'key_version', v_version));
    RETURN QUERY SELECT 'ok', v_key_id, v_version, v_sealed, v_kek_id,
                        v_limit, v_spent, v_reserved;
END;
$$;

-- CheckLimit. Without an estimate a pure read; with one, the estimate is reserved by one guarded
-- UPDATE so that concurrent callers can never reserve more than the remaining budget.
-- o_outcome: ok | no_key | disabled.
CREATE FUNCTION kb_check_limit(p_user text, p_estimate numeric, p_request_id text,
                               p_new_reservation uuid, p_now timestamptz, p_period date,
                               p_expire timestamptz)
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
    SELECT * INTO v_state FROM kb_user_state(p_user);
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
    IF p_estimate IS NULL THEN
        SELECT t.spent_usd, t.reserved_usd INTO v_spent, v_reserved
        FROM kb_period_totals(p_user, p_period, p_now) t;
        RETURN QUERY SELECT 'ok', (v_state.limit_usd IS NULL OR v_spent + v_reserved < v_state.limit_usd),
                            v_state.limit_usd, v_spent, v_reserved, v_state.key_version,
                            NULL::uuid, NULL::timestamptz;
        RETURN;
    END IF;

    PERFORM kb_lock_period(p_user, p_period);
    PERFORM kb_release_expired(p_user, p_now);
    IF p_request_id IS NOT NULL THEN
        SELECT r.reservation_id, r.expire_time INTO v_res_id, v_expire
        FROM reservations r WHERE r.user_id = p_user AND r.request_id = p_request_id;
    END IF;
    IF v_res_id IS NULL THEN
        UPDATE usage_periods p SET reserved_usd = p.reserved_usd + p_estimate
        WHERE p.user_id = p_user AND p.period_start = p_period
          AND (v_state.limit_usd IS NULL OR p.spent_usd + p.reserved_usd + p_estimate <= v_state.limit_usd);
        IF FOUND THEN
            INSERT INTO reservations (user_id, reservation_id, period_start, amount_usd, request_id,
                                      create_time, expire_time)
            VALUES (p_user, p_new_reservation, p_period, p_estimate, p_request_id, p_now, p_expire);
            v_res_id := p_new_reservation;
            v_expire := p_expire;
        END IF;
    END IF;
    SELECT p.spent_usd, p.reserved_usd INTO v_spent, v_reserved
    FROM usage_periods p WHERE p.user_id = p_user AND p.period_start = p_period;
    RETURN QUERY SELECT 'ok', v_res_id IS NOT NULL, v_state.limit_usd, v_spent, v_reserved,
                        v_state.key_version, v_res_id, v_expire;
END;
$$;

-- RecordUsage: idempotent by (user_id, request_id); settles the reservation and adds the cost in
-- the same transaction; always records, even past the limit. A retry gets the first answer.
-- o_outcome: ok | no_key. Raises SQLSTATE KB409 if a duplicate raced in from another period.
CREATE FUNCTION kb_record_usage(p_user text, p_request_id text, p_reservation_id uuid,
                                p_model text, p_agent text, p_prompt bigint, p_completion bigint,
                                p_total bigint, p_cost numeric, p_duration_ms bigint,
                                p_now timestamptz, p_period date)
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
BEGIN
    SELECT * INTO v_state FROM kb_user_state(p_user);
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_key', false, NULL::numeric, NULL::numeric, false;
        RETURN;
    END IF;
    -- Holding the period lock, a concurrent duplicate of this request has either committed
    -- (and is seen below) or waits behind us.
    PERFORM kb_lock_period(p_user, p_period);
    RETURN QUERY SELECT 'ok', true, l.spent_after_usd, l.remaining_after_usd, l.over_limit
    FROM usage_ledger l WHERE l.user_id = p_user AND l.request_id = p_request_id;
    IF FOUND THEN
        RETURN;
    END IF;

    PERFORM kb_release_expired(p_user, p_now);
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
    RETURNING p.spent_usd, p.reserved_usd INTO v_spent, v_reserved;
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
    RETURN QUERY SELECT 'ok', false, v_spent, v_remaining, v_over;
END;
$$;

-- ReleaseReservation: frees a reservation whose call never happened.
CREATE FUNCTION kb_release_reservation(p_user text, p_reservation_id uuid, p_now timestamptz,
                                       p_period date)
RETURNS TABLE (o_released boolean, o_reserved numeric)
LANGUAGE plpgsql AS $$
DECLARE
    v_amount numeric;
    v_period date;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM users u WHERE u.user_id = p_user) THEN
        RETURN QUERY SELECT false, 0::numeric;  -- nothing to release, and no row for strangers
        RETURN;
    END IF;
    PERFORM kb_lock_period(p_user, p_period);
    DELETE FROM reservations r
    WHERE r.user_id = p_user AND r.reservation_id = p_reservation_id AND r.expire_time > p_now
    RETURNING r.amount_usd, r.period_start INTO v_amount, v_period;
    IF FOUND THEN
        UPDATE usage_periods p SET reserved_usd = p.reserved_usd - v_amount
        WHERE p.user_id = p_user AND p.period_start = v_period;
    END IF;
    PERFORM kb_release_expired(p_user, p_now);
    RETURN QUERY SELECT v_amount IS NOT NULL, t.reserved_usd
    FROM kb_period_totals(p_user, p_period, p_now) t;
END;
$$;
