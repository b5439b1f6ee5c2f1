-- The hot path as SQL functions: each RPC is one round trip to the database and one implicit
-- transaction, which also keeps it correct behind PgBouncer in transaction mode. This file holds
-- the shared pieces and ReleaseReservation; kb_get_key, kb_check_limit and kb_record_usage are
-- defined in 0004, once the audit chain (0003) and the roll-ups and rate limits they use exist.
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
