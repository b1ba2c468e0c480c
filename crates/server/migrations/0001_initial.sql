-- Times are Unix milliseconds (UTC): they compare as numbers, and the API formats them as
-- RFC 3339.

CREATE TABLE users (
    username      TEXT PRIMARY KEY NOT NULL,
    created_at    INTEGER NOT NULL,
    last_login_at INTEGER NOT NULL
);

-- Only a SHA-256 of each session token is stored; the password never is.
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY NOT NULL,
    username   TEXT NOT NULL REFERENCES users (username),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);

CREATE TABLE agents (
    name      TEXT PRIMARY KEY NOT NULL,
    role      TEXT NOT NULL,
    version   TEXT NOT NULL,
    host      TEXT NOT NULL,
    connected INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    running   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_by_time ON audit (at);
