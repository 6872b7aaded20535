-- The registrar's tables (PostgreSQL). Times are unix seconds.
CREATE TABLE users (
    name TEXT PRIMARY KEY NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'installer')),
    password_hash TEXT NOT NULL,
    failed_logins BIGINT NOT NULL DEFAULT 0,
    locked_until BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY NOT NULL,
    user_name TEXT NOT NULL REFERENCES users(name),
    expires_at BIGINT NOT NULL
);
CREATE TABLE devices (
    serial TEXT PRIMARY KEY NOT NULL,
    project TEXT NOT NULL,
    hardware TEXT NOT NULL,
    groups_list TEXT NOT NULL,
    pop_key TEXT,
    state TEXT NOT NULL CHECK (state IN ('active', 'retired')),
    created_at BIGINT NOT NULL,
    enrolled_at BIGINT
);
CREATE TABLE claims (
    digest TEXT PRIMARY KEY NOT NULL,
    serial TEXT NOT NULL REFERENCES devices(serial),
    user_name TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE TABLE certificates (
    serial_hex TEXT PRIMARY KEY NOT NULL,
    device TEXT NOT NULL REFERENCES devices(serial),
    public_key BYTEA NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'superseded', 'revoked')),
    revoked_at BIGINT,
    reason TEXT,
    pem TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
-- At most one active certificate per device.
CREATE UNIQUE INDEX certificates_one_active ON certificates (device) WHERE state = 'active';
CREATE INDEX certificates_device ON certificates (device);
CREATE TABLE crl_state (
    id INT PRIMARY KEY NOT NULL CHECK (id = 1),
    number BIGINT NOT NULL
);
INSERT INTO crl_state (id, number) VALUES (1, 0);
CREATE TABLE audit (
    id BIGINT PRIMARY KEY NOT NULL,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
-- The chain's head: one row, updated in every append's transaction, so
-- appends are serialized (its row lock) across instances.
CREATE TABLE audit_head (
    id INT PRIMARY KEY NOT NULL CHECK (id = 1),
    last_id BIGINT NOT NULL,
    last_hash TEXT NOT NULL
);
INSERT INTO audit_head (id, last_id, last_hash) VALUES (1, 0, '');
