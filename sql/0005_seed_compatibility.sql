-- Seed compatibility: the SQL functions the seed project's callers use, rebuilt on this schema so
-- existing SQL callers (psql scripts, Supabase .rpc() calls, dashboards) keep working.
--
-- All four are SECURITY INVOKER: they read with the caller's privileges, so where row-level
-- security is on (0006, Supabase only) a signed-in user sees only their own rows through them.
-- None of them ever reads api_keys.sealed_secret or api_keys.kek_id.
--
-- Money comes back as NUMERIC (trim_scale'd: 10, not 10.0000000000) and, in JSON, as JSON numbers
-- built from NUMERIC, which jsonb keeps exact digit for digit.

-- A user's current key, without its secret. No row for an unknown user (or one not visible to the
-- caller under row-level security).
CREATE FUNCTION get_user_api_key(p_user_id text)
RETURNS TABLE (user_id text, key_id text, key_version bigint, tier text,
               monthly_limit_usd numeric, status text, created_at timestamptz,
               rotated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT u.user_id,
           k.key_id,
           k.key_version,
           u.tier,
           trim_scale(coalesce(u.custom_limit_usd, t.monthly_limit_usd)),
           CASE
               WHEN k.status = 'revoked' THEN 'revoked'
               WHEN u.disabled OR k.status <> 'active' THEN 'disabled'
               ELSE 'active'
           END,
           u.create_time,
           -- Version 1 is the user's first key: it replaced nothing.
           CASE WHEN k.key_version > 1 THEN k.create_time END
    FROM users u
    JOIN tiers t ON t.name = u.tier
    JOIN api_keys k ON k.user_id = u.user_id AND k.key_version = u.current_key_version
    WHERE u.user_id = p_user_id;
$$;
COMMENT ON FUNCTION get_user_api_key(text) IS
'Seed compatibility. Metadata of the user''s current OpenRouter key, never the secret: user_id, '
'key_id (OpenRouter key hash), key_version (+1 per rotation), tier, monthly_limit_usd (effective '
'limit: the custom limit, else the tier''s; NULL = unlimited), status (active | disabled | revoked), '
'created_at (user created), rotated_at (when the current key replaced an earlier one; NULL for the '
'first key). No row for an unknown user, or for another user when row-level security applies. '
'The secret is only disclosed by the GetKey RPC, which audits it.';

-- The seed's limit check, for the current UTC month of the database clock.
CREATE FUNCTION check_usage_limit(p_user_id text)
RETURNS TABLE (allowed boolean, limit_usd numeric, spent_usd numeric, reserved_usd numeric,
               remaining_usd numeric, unlimited boolean, period_start date)
LANGUAGE sql STABLE AS $$
    WITH state AS (
        SELECT coalesce(u.custom_limit_usd, t.monthly_limit_usd) AS limit_usd,
               NOT u.disabled AND k.status = 'active' AS usable,
               date_trunc('month', now() AT TIME ZONE 'UTC')::date AS period_start
        FROM users u
        JOIN tiers t ON t.name = u.tier
        JOIN api_keys k ON k.user_id = u.user_id AND k.key_version = u.current_key_version
        WHERE u.user_id = p_user_id
    ), totals AS (
        SELECT s.limit_usd, s.usable, s.period_start,
               coalesce(p.spent_usd, 0) AS spent,
               -- Reservations past their expiry no longer count, swept or not (as kb_period_totals).
               coalesce(p.reserved_usd, 0) - coalesce((
                   SELECT sum(r.amount_usd) FROM reservations r
                   WHERE r.user_id = p_user_id AND r.period_start = s.period_start
                     AND r.expire_time <= now()), 0) AS reserved
        FROM state s
        LEFT JOIN usage_periods p ON p.user_id = p_user_id AND p.period_start = s.period_start
    )
    SELECT x.usable AND (x.limit_usd IS NULL OR x.spent + x.reserved < x.limit_usd),
           trim_scale(x.limit_usd),
           trim_scale(x.spent),
           trim_scale(x.reserved),
           trim_scale(x.limit_usd - x.spent - x.reserved),
           x.limit_usd IS NULL,
           x.period_start
    FROM totals x;
$$;
COMMENT ON FUNCTION check_usage_limit(text) IS
'Seed compatibility. May the user spend, this calendar month (UTC, by the database clock now())? '
'One row: allowed (the key is active and not disabled, and spent + live reservations < limit, or '
'the user is unlimited), limit_usd (NULL = unlimited), spent_usd, reserved_usd (unexpired '
'reservations), remaining_usd (limit - spent - reserved, may be negative; NULL = unlimited), '
'unlimited, period_start (first day of the month). No row for an unknown user. A pure read: it '
'reserves nothing (use the CheckLimit RPC with an estimate for that).';

-- The seed's monthly summary JSON, from the daily roll-ups (never a ledger scan).
CREATE FUNCTION get_user_usage_summary(p_user_id text, p_month_date date)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH by_model AS (
        SELECT d.model,
               sum(d.requests) AS requests,
               sum(d.total_tokens) AS tokens,
               sum(d.cost_usd) AS cost
        FROM usage_daily d
        WHERE d.user_id = p_user_id
          AND d.day >= date_trunc('month', p_month_date::timestamp)::date
          AND d.day < (date_trunc('month', p_month_date::timestamp) + interval '1 month')::date
        GROUP BY d.model
    )
    SELECT CASE WHEN EXISTS (SELECT 1 FROM users u WHERE u.user_id = p_user_id) THEN (
        SELECT jsonb_build_object(
                   'total_requests', coalesce(sum(m.requests), 0),
                   'total_tokens', coalesce(sum(m.tokens), 0),
                   'total_cost', trim_scale(coalesce(sum(m.cost), 0)),
                   'model_breakdown', coalesce(
                       jsonb_object_agg(m.model, jsonb_build_object(
                           'requests', m.requests, 'tokens', m.tokens, 'cost', trim_scale(m.cost))),
                       '{}'::jsonb))
        FROM by_model m)
    END;
$$;
COMMENT ON FUNCTION get_user_usage_summary(text, date) IS
'Seed compatibility. Usage of the calendar month (UTC) that contains p_month_date, as the seed''s '
'JSON: {"total_requests": n, "total_tokens": n, "total_cost": n, "model_breakdown": {"<model>": '
'{"requests": n, "tokens": n, "cost": n}}}. Costs are exact JSON numbers in US dollars (built from '
'NUMERIC); tokens are total tokens. A known user with no usage gets zeros and an empty '
'model_breakdown; an unknown user (or another user under row-level security) gets NULL.';

-- Periods roll over by themselves (one counter row per user and month), so there is nothing to
-- reset. What is left of a past month is reservations nobody settled: this releases them.
--
-- Lock order as everywhere else (0002): the user's current period row first, then reservations,
-- then other period rows. reserved_usd always equals the sum of its period's reservation rows, so
-- taking the deleted rows off leaves it at 0; subtracting (rather than assigning 0) also keeps it
-- right if a replica whose clock is still in the old month reserves into it at the same moment.
CREATE FUNCTION reset_monthly_usage() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_current date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    v_user text;
    v_rows integer;
    v_closed integer := 0;
BEGIN
    FOR v_user IN
        SELECT DISTINCT r.user_id FROM reservations r
        WHERE r.period_start < v_current ORDER BY r.user_id
    LOOP
        PERFORM 1 FROM usage_periods p
        WHERE p.user_id = v_user AND p.period_start = v_current FOR UPDATE;
        WITH gone AS (
            DELETE FROM reservations r
            WHERE r.user_id = v_user AND r.period_start < v_current
            RETURNING r.period_start, r.amount_usd
        ), per_period AS (
            SELECT g.period_start, sum(g.amount_usd) AS amount FROM gone g GROUP BY g.period_start
        ), closed AS (
            UPDATE usage_periods p SET reserved_usd = p.reserved_usd - pp.amount
            FROM per_period pp
            WHERE p.user_id = v_user AND p.period_start = pp.period_start
            RETURNING p.period_start
        )
        SELECT count(*) INTO v_rows FROM closed;
        v_closed := v_closed + v_rows;
    END LOOP;
    RETURN v_closed;
END;
$$;
COMMENT ON FUNCTION reset_monthly_usage() IS
'Seed compatibility. Nothing needs resetting: spend lives in one counter row per user and calendar '
'month (UTC), so a new month starts at zero by itself. This only closes past periods: it deletes '
'reservations of months before the current one (by now()) that are still counted and takes them '
'off those periods'' reserved_usd (leaving it 0), and returns how many period rows it closed. It '
'never changes spent amounts, request counts or the ledger. Safe to run at any time, any number '
'of times (a second run returns 0).';
