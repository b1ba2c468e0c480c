-- Instances after ready (issue 11): how each service's instance fares, as its agent reports
-- it, and where each agent's runtime events of a sandbox stand.

-- Why the service is not running (`exit code 1`, `/healthz gave status 500`), for people.
ALTER TABLE sandbox_services ADD COLUMN reason TEXT;
-- The instance's last lines before it crashed, a JSON array of strings, oldest first.
ALTER TABLE sandbox_services ADD COLUMN last_lines TEXT;
-- Restarts of the instance since it was deployed, as its agent counts them.
ALTER TABLE sandbox_services ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
-- When (the agent's clock, Unix ms) the instance now recorded started or was last reported:
-- a report older than this is about an instance a deployment has replaced since.
ALTER TABLE sandbox_services ADD COLUMN reported_at INTEGER;

-- The last runtime event stored per sandbox and agent (the agent's `seq`): an event at or
-- below it is a duplicate, sent again after a reconnect, and is acknowledged and dropped.
CREATE TABLE runtime_cursors (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes (id),
    agent      TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, agent)
);
