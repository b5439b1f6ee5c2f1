-- Usage alerts (an outbox written in the RecordUsage transaction), daily and hourly roll-ups
-- (reports and summaries never scan the ledger), and optional per-user request rate limits.

-- Per (user, UTC day, model, agent): what reports and GetUsageSummary read.
CREATE TABLE usage_daily (
    user_id           text NOT NULL,
    day               date NOT NULL,
    model             text NOT NULL,
    agent             text NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens      bigint NOT NULL DEFAULT 0,
    cost_usd          numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day, model, agent)
);
CREATE INDEX usage_daily_day ON usage_daily (day);

-- Per (user, UTC hour): what anomaly detection reads.
CREATE TABLE usage_hourly (
    user_id  text NOT NULL,
    hour     timestamptz NOT NULL,
    requests bigint NOT NULL DEFAULT 0,
    cost_usd numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, hour)
);
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);

INSERT INTO usage_daily
SELECT user_id, (record_time AT TIME ZONE 'UTC')::date, model, agent, count(*),
       sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(cost_usd)
FROM usage_ledger GROUP BY 1, 2, 3, 4;
INSERT INTO usage_hourly
SELECT user_id, date_trunc('hour', record_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', count(*),
       sum(cost_usd)
FROM usage_ledger GROUP BY 1, 2;

-- The alert outbox: each alert is fired exactly once (unique dedup key per user and month) in
-- the transaction that crossed it, then delivered by the dispatcher until every webhook took it.
CREATE TABLE alerts (
    user_id           text NOT NULL,
    alert_id          uuid NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('THRESHOLD', 'ANOMALY')),
    period_start      date NOT NULL,
    dedup_key         text NOT NULL,  -- 'threshold:80', 'anomaly:2026-11-27T10'
    threshold_percent integer,
    spent_usd         numeric NOT NULL,
    reference_usd     numeric,
    create_time       timestamptz NOT NULL,
    deliver_time      timestamptz,
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_time timestamptz NOT NULL,
    last_error        text,
    PRIMARY KEY (user_id, alert_id)
);
CREATE UNIQUE INDEX alerts_once ON alerts (user_id, period_start, dedup_key);
CREATE INDEX alerts_pending ON alerts (next_attempt_time) WHERE deliver_time IS NULL;
CREATE INDEX alerts_time ON alerts (create_time);

-- Which webhook took which alert (webhook_id = sha256 of the URL: URLs are secrets).
CREATE TABLE alert_deliveries (
    user_id        text NOT NULL,
    alert_id       uuid NOT NULL,
    webhook_id     text NOT NULL,
    delivered_time timestamptz NOT NULL,
    PRIMARY KEY (user_id, alert_id, webhook_id)
);

-- How many of the configured thresholds this period has fired (thresholds ascending).
ALTER TABLE usage_periods ADD COLUMN alert_level integer NOT NULL DEFAULT 0;

-- Optional requests-per-minute limits on GetKey/CheckLimit: tier default, per-user override.
ALTER TABLE tiers ADD COLUMN requests_per_minute integer CHECK (requests_per_minute > 0);
ALTER TABLE users ADD COLUMN custom_requests_per_minute integer
    CHECK (custom_requests_per_minute > 0);
-- Fixed one-minute windows per user; old windows are deleted by a background task.
CREATE TABLE rate_windows (
    user_id      text NOT NULL,
    window_start timestamptz NOT NULL,
    count        integer NOT NULL,
    PRIMARY KEY (user_id, window_start)
);

-- Count one call against the user's rate limit; false when the limit is used up.
CREATE FUNCTION kb_take_rate_slot(p_user text, p_now timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_rpm integer;
    v_count integer;
BEGIN
    SELECT coalesce(u.custom_requests_per_minute, t.requests_per_minute) INTO v_rpm
    FROM users u JOIN tiers t ON t.name = u.tier WHERE u.user_id = p_user;
    IF v_rpm IS NULL THEN
        RETURN true;
    END IF;
    INSERT INTO rate_windows AS w (user_id, window_start, count)
    VALUES (p_user, date_trunc('minute', p_now), 1)
    ON CONFLICT (user_id, window_start) DO UPDATE SET count = w.count + 1
    RETURNING w.count INTO v_count;
    RETURN v_count <= v_rpm;
END;
$$;

-- GetKey: the sealed secret for disclosure, with its audit row (kb_audit, the user's hash chain)
-- in the same transaction. o_outcome: ok | no_key | disabled | limit | rate_limited.
CREATE FUNCTION kb_get_key(p_user text, p_period date, p_now timestamptz, p_actor text,
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
    IF NOT kb_take_rate_slot(p_user, p_now) THEN
        RETURN QUERY SELECT 'rate_limited', v_key_id, v_version, NULL::bytea, NULL::text,
                            v_limit, v_spent, v_reserved;
        RETURN;
    END IF;
    PERFORM kb_audit(p_user, p_now, p_actor, 'key.disclosed',
                     jsonb_build_object('key_id', v_key_id, 'key_version', v_version));
    RETURN QUERY SELECT 'ok', v_key_id, v_version, v_sealed, v_kek_id, v_limit, v_spent, v_reserved;
END;
$$;

-- CheckLimit. Without an estimate a pure read; with one, the estimate is reserved by one guarded
-- UPDATE so that concurrent callers can never reserve more than the remaining budget.
-- o_outcome: ok | no_key | disabled | rate_limited.
CREATE FUNCTION kb_check_limit(p_user text, p_estimate numeric, p_request_id text,
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
    IF NOT kb_take_rate_slot(p_user, p_now) THEN
        RETURN QUERY SELECT 'rate_limited', false, v_state.limit_usd, NULL::numeric,
                            NULL::numeric, v_state.key_version, NULL::uuid, NULL::timestamptz;
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

-- RecordUsage: idempotent by (user_id, request_id); settles the reservation, adds the cost, keeps
-- the daily/hourly roll-ups and fires threshold alerts, all in one transaction; always records,
-- even past the limit. A retry gets the first answer. p_thresholds: percentages of the limit,
-- ascending (e.g. {80,100}). o_outcome: ok | no_key. Raises SQLSTATE KB409 if a duplicate raced
-- in from another period (the caller runs it again).
CREATE FUNCTION kb_record_usage(p_user text, p_request_id text, p_reservation_id uuid,
                                p_model text, p_agent text, p_prompt bigint, p_completion bigint,
                                p_total bigint, p_cost numeric, p_duration_ms bigint,
                                p_now timestamptz, p_period date, p_thresholds numeric[])
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
    v_new_level integer;
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
        SELECT count(*) INTO v_new_level FROM unnest(p_thresholds) t
        WHERE v_spent >= v_state.limit_usd * t / 100;
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
