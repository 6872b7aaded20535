-- Rollouts that `fleetctl rollout` started, watched or halted, and the last
-- state each device reported for them, so a restarted `watch` carries on.
-- Times are unix seconds.
CREATE TABLE rollouts (
    jti TEXT PRIMARY KEY NOT NULL,
    project TEXT NOT NULL,
    group_name TEXT NOT NULL,
    version BIGINT NOT NULL,
    message TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    halt_message TEXT,
    halted_at BIGINT,
    halt_reason TEXT
);
CREATE TABLE rollout_devices (
    jti TEXT NOT NULL REFERENCES rollouts(jti),
    device TEXT NOT NULL,
    wave BIGINT NOT NULL,
    state TEXT NOT NULL,
    bytes_fetched BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (jti, device)
);
