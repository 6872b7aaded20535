-- Each CRL's thisUpdate, strictly increasing: OpenSSL (mosquitto after a
-- SIGHUP) keeps every CRL it loaded and trusts the one with the latest
-- thisUpdate, at one-second resolution.
ALTER TABLE crl_state ADD COLUMN this_update BIGINT NOT NULL DEFAULT 0;
