-- Key lifecycle you can trust: intents for crash-safe key creation, leases for one leader per
-- background task, a key change log for WatchKeys, a tamper-evident audit chain, and the rate
-- limit of ReportKeyInvalid.

-- Written before OpenRouter is asked to create a key, finished in the transaction that stores it.
-- A pending intent whose process died is rolled back: the provider key (found by its unique
-- name, its secret lost) is disabled and deleted, and a retry starts again.
CREATE TABLE key_intents (
    user_id       text NOT NULL,
    key_version   bigint NOT NULL,
    request_id    text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('provision', 'rotate')),
    provider_name text NOT NULL,
    -- Each attempt at the version gets a new id; only the attempt holding the intent may commit.
    attempt       uuid NOT NULL,
    state         text NOT NULL CHECK (state IN ('pending', 'done', 'rolled_back')),
    create_time   timestamptz NOT NULL,
    update_time   timestamptz NOT NULL,
    PRIMARY KEY (user_id, key_version)
);
CREATE INDEX key_intents_pending ON key_intents (update_time) WHERE state = 'pending';

-- One row per background task; the holder renews it before it expires.
CREATE TABLE leases (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    expire_time timestamptz NOT NULL
);

-- What WatchKeys streams. NOTIFY wakes the replicas; polling the table catches a missed one.
CREATE TABLE key_events (
    user_id     text NOT NULL,
    event_id    uuid NOT NULL,
    event_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind        text NOT NULL CHECK (kind IN ('PROVISIONED', 'ROTATED', 'REVOKED', 'DISABLED',
                                              'ENABLED', 'LIMIT_CHANGED')),
    key_id      text NOT NULL,
    key_version bigint NOT NULL,
    PRIMARY KEY (user_id, event_id)
);
CREATE INDEX key_events_time ON key_events (event_time);

CREATE FUNCTION kb_notify_key_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keybroker_key_events', NEW.user_id);
    RETURN NEW;
END;
$$;
CREATE TRIGGER key_events_notify AFTER INSERT ON key_events
    FOR EACH ROW EXECUTE FUNCTION kb_notify_key_event();

CREATE FUNCTION kb_key_event(p_user text, p_kind text, p_key_id text, p_version bigint)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO key_events (user_id, event_id, kind, key_id, key_version)
    VALUES (p_user, gen_random_uuid(), p_kind, p_key_id, p_version);
$$;

-- Rate limit of ReportKeyInvalid: at most one provider check per user per interval.
CREATE TABLE key_invalid_reports (
    user_id         text PRIMARY KEY,
    last_check_time timestamptz NOT NULL,
    checks          bigint NOT NULL DEFAULT 0
);

-- Tamper-evident audit: one hash chain per user (user_id '' for events about no user), so the
-- chain never serialises different users. row_hash = sha256(prev_hash || content) where content
-- is kb_audit_content(...) below; audit_heads holds each chain's last link.
ALTER TABLE audit_log ADD COLUMN seq bigint, ADD COLUMN prev_hash bytea, ADD COLUMN row_hash bytea;
CREATE TABLE audit_heads (
    user_id  text PRIMARY KEY,
    seq      bigint NOT NULL,
    row_hash bytea NOT NULL
);

CREATE FUNCTION kb_audit_content(p_user text, p_seq bigint, p_time timestamptz, p_actor text,
                                 p_action text, p_details jsonb)
RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    SELECT convert_to(concat_ws('|', p_user, p_seq::text,
                                ((extract(epoch FROM p_time) * 1000000)::bigint)::text,
                                p_actor, p_action, p_details::text), 'UTF8');
$$;

CREATE FUNCTION kb_audit(p_user text, p_time timestamptz, p_actor text, p_action text,
                         p_details jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_seq bigint;
    v_prev bytea;
    v_hash bytea;
BEGIN
    INSERT INTO audit_heads (user_id, seq, row_hash)
    VALUES (p_user, 0, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
    ON CONFLICT DO NOTHING;
    SELECT h.seq + 1, h.row_hash INTO v_seq, v_prev
    FROM audit_heads h WHERE h.user_id = p_user FOR UPDATE;
    v_hash := sha256(v_prev || kb_audit_content(p_user, v_seq, p_time, p_actor, p_action, p_details));
    INSERT INTO audit_log (user_id, event_id, event_time, actor, action, details, seq, prev_hash, row_hash)
    VALUES (p_user, gen_random_uuid(), p_time, p_actor, p_action, p_details, v_seq, v_prev, v_hash);
    UPDATE audit_heads SET seq = v_seq, row_hash = v_hash WHERE user_id = p_user;
END;
$$;

-- Chain the rows written before this migration, oldest first.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM audit_log ORDER BY user_id, event_time, event_id LOOP
        DELETE FROM audit_log WHERE user_id = r.user_id AND event_id = r.event_id;
        PERFORM kb_audit(r.user_id, r.event_time, r.actor, r.action, r.details);
    END LOOP;
END;
$$;
ALTER TABLE audit_log ALTER COLUMN seq SET NOT NULL, ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN row_hash SET NOT NULL;
CREATE UNIQUE INDEX audit_log_chain ON audit_log (user_id, seq);
