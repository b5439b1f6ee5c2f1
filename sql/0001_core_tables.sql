-- Core tables of the key broker. Every table that grows is keyed by user_id first, has no
-- sequential ids, and is written by single-user transactions only, so the schema works behind
-- PgBouncer (transaction mode) and can be distributed by user_id.

-- Subscription tiers and their monthly limits (NULL = unlimited).
CREATE TABLE tiers (
    name              text PRIMARY KEY CHECK (name ~ '^[a-z0-9_]{1,32}$'),
    monthly_limit_usd numeric(22, 10) CHECK (monthly_limit_usd >= 0),
    description       text NOT NULL DEFAULT ''
);

INSERT INTO tiers (name, monthly_limit_usd, description) VALUES
    ('free',        10,   'Free tier'),
    ('standard',    50,   'Standard subscription'),
    ('micro',       100,  'Micro subscription'),
    ('operator',    250,  'Operator subscription'),
    ('enterprise',  500,  'Enterprise subscription'),
    ('beta',        1000, 'Beta programme'),
    ('admin',       NULL, 'Administrators: unlimited'),
    ('future4200',  NULL, 'Reserved unlimited tier');

-- Per-user settings. current_key_version points at the user's current api_keys row.
CREATE TABLE users (
    user_id             text PRIMARY KEY CHECK (user_id ~ '^[A-Za-z0-9._:@-]{1,128}$'),
    tier                text NOT NULL REFERENCES tiers (name),
    custom_limit_usd    numeric(22, 10) CHECK (custom_limit_usd >= 0),
    disabled            boolean NOT NULL DEFAULT false,
    current_key_version bigint NOT NULL,
    create_time         timestamptz NOT NULL,
    update_time         timestamptz NOT NULL
);

-- Every OpenRouter key ever issued to a user. The secret is sealed (AES-256-GCM, envelope) and
-- never stored in plaintext. status: active (current), previous (rotated away), revoked.
CREATE TABLE api_keys (
    user_id           text NOT NULL REFERENCES users (user_id),
    key_version       bigint NOT NULL CHECK (key_version > 0),
    key_id            text NOT NULL,
    provider_name     text NOT NULL,
    status            text NOT NULL CHECK (status IN ('active', 'previous', 'revoked')),
    sealed_secret     bytea NOT NULL,
    kek_id            text NOT NULL,
    request_id        text,
    -- Spend of this calendar month that happened before this key existed: the provider key's
    -- own monthly window starts at zero, so its limit is the user's limit minus this.
    limit_base_usd    numeric NOT NULL DEFAULT 0,
    limit_base_period date NOT NULL,
    create_time       timestamptz NOT NULL,
    -- A pending retirement: disable (or delete) the provider key at retire_at. Lives here so it
    -- happens even if the replica that scheduled it dies.
    retire_at         timestamptz,
    retire_delete     boolean NOT NULL DEFAULT false,
    retired_time      timestamptz,
    PRIMARY KEY (user_id, key_version)
);
CREATE UNIQUE INDEX api_keys_one_active ON api_keys (user_id) WHERE status = 'active';
CREATE UNIQUE INDEX api_keys_request ON api_keys (user_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX api_keys_retire_due ON api_keys (retire_at) WHERE retire_at IS NOT NULL AND retired_time IS NULL;
CREATE INDEX api_keys_key_id ON api_keys (key_id);

-- One spend counter per (user, calendar month in UTC): a new month starts at zero by itself.
CREATE TABLE usage_periods (
    user_id       text NOT NULL,
    period_start  date NOT NULL CHECK (extract(day FROM period_start) = 1),
    spent_usd     numeric NOT NULL DEFAULT 0,
    reserved_usd  numeric NOT NULL DEFAULT 0 CHECK (reserved_usd >= 0),
    request_count bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start)
);

-- Open reservations made by CheckLimit with an estimate; deleted when settled, released or expired.
CREATE TABLE reservations (
    user_id        text NOT NULL,
    reservation_id uuid NOT NULL,
    period_start   date NOT NULL,
    amount_usd     numeric(22, 10) NOT NULL CHECK (amount_usd > 0),
    request_id     text,
    create_time    timestamptz NOT NULL,
    expire_time    timestamptz NOT NULL,
    PRIMARY KEY (user_id, reservation_id)
);
CREATE UNIQUE INDEX reservations_request ON reservations (user_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX reservations_expiry ON reservations (expire_time);

-- The usage ledger: insert-only, one row per finished OpenRouter call. The result columns keep
-- the first answer so a retried RecordUsage returns it unchanged.
CREATE TABLE usage_ledger (
    user_id             text NOT NULL,
    request_id          text NOT NULL,
    period_start        date NOT NULL,
    record_time         timestamptz NOT NULL,
    key_version         bigint,
    reservation_id      uuid,
    model               text NOT NULL,
    agent               text NOT NULL,
    prompt_tokens       bigint NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens   bigint NOT NULL CHECK (completion_tokens >= 0),
    total_tokens        bigint NOT NULL CHECK (total_tokens >= 0),
    cost_usd            numeric(22, 10) NOT NULL CHECK (cost_usd >= 0),
    duration_ms         bigint NOT NULL CHECK (duration_ms >= 0),
    spent_after_usd     numeric NOT NULL,
    remaining_after_usd numeric,
    over_limit          boolean NOT NULL,
    PRIMARY KEY (user_id, request_id)
);
CREATE INDEX usage_ledger_period ON usage_ledger (user_id, period_start);

-- Caller tokens: only a SHA-256 hash of the secret part is stored.
CREATE TABLE caller_tokens (
    token_id    text PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    scope       text NOT NULL CHECK (scope IN ('agent', 'admin')),
    secret_hash bytea NOT NULL,
    create_time timestamptz NOT NULL,
    revoke_time timestamptz
);
CREATE UNIQUE INDEX caller_tokens_live_name ON caller_tokens (name) WHERE revoke_time IS NULL;

-- Who did what to whom, when: every key disclosure and every admin change.
CREATE TABLE audit_log (
    user_id    text NOT NULL,  -- whom; '' when the action concerns no user
    event_id   uuid NOT NULL,
    event_time timestamptz NOT NULL,
    actor      text NOT NULL,  -- caller token name, or "cli:<os user>" / "system"
    action     text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (user_id, event_id)
);
CREATE INDEX audit_log_time ON audit_log (event_time);
