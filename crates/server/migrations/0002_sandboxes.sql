-- Sandboxes, their deployments and the steps of those (SPEC §3, §11).

CREATE TABLE sandboxes (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    owner      TEXT NOT NULL,
    -- deploying | ready | failed | expired | deleted
    state      TEXT NOT NULL,
    -- The micro agent that runs it; its redeploys go there too.
    agent      TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    ended_at   INTEGER
);
-- A name is taken while its sandbox lives; it can be used again after that.
CREATE UNIQUE INDEX sandboxes_live_name ON sandboxes (name) WHERE state NOT IN ('expired', 'deleted');
CREATE INDEX sandboxes_newest_first ON sandboxes (created_at DESC, id DESC);

CREATE TABLE sandbox_services (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes (id),
    service    TEXT NOT NULL,
    branch     TEXT NOT NULL,
    commit_sha TEXT,
    -- deploying | running | failed | stopped
    state      TEXT NOT NULL,
    upstream   TEXT,
    PRIMARY KEY (sandbox_id, service)
);

CREATE TABLE deployments (
    id           TEXT PRIMARY KEY NOT NULL,
    sandbox_id   TEXT NOT NULL REFERENCES sandboxes (id),
    requested_by TEXT NOT NULL,
    -- queued | running | ready | failed | cancelled
    state        TEXT NOT NULL,
    error        TEXT,
    agent        TEXT,
    -- The last event stored; the next must carry last_seq + 1.
    last_seq     INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    finished_at  INTEGER
);
CREATE INDEX deployments_newest_first ON deployments (created_at DESC, id DESC);
CREATE INDEX deployments_by_sandbox ON deployments (sandbox_id, created_at DESC);

CREATE TABLE deployment_services (
    deployment_id TEXT NOT NULL REFERENCES deployments (id),
    service       TEXT NOT NULL,
    branch        TEXT NOT NULL,
    commit_sha    TEXT,
    step          TEXT NOT NULL,
    state         TEXT NOT NULL,
    PRIMARY KEY (deployment_id, service)
);

-- Each step with its start and end; service is '' for steps of the whole deployment.
CREATE TABLE deployment_steps (
    deployment_id TEXT NOT NULL REFERENCES deployments (id),
    service       TEXT NOT NULL,
    step          TEXT NOT NULL,
    state         TEXT NOT NULL,
    started_at    INTEGER NOT NULL,
    ended_at      INTEGER,
    PRIMARY KEY (deployment_id, service, step)
);
