-- At most one deployment of a sandbox is queued or running: the database refuses a second
-- even when two requests race past the check.
CREATE UNIQUE INDEX deployments_one_active_per_sandbox
    ON deployments (sandbox_id) WHERE state IN ('queued', 'running');
