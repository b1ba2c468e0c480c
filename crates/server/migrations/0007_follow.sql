-- Following a branch (issue 15): a push to a followed branch redeploys the service with its
-- owner's credentials, while the control plane holds them.

-- 1: the service is redeployed when its branch moves.
ALTER TABLE sandbox_services ADD COLUMN follow INTEGER NOT NULL DEFAULT 0;
-- The newest commit of the followed branch that waits to be deployed, and why it waits
-- ("log in to deploy it"); cleared by the next deployment of the service.
ALTER TABLE sandbox_services ADD COLUMN pending_commit TEXT;
ALTER TABLE sandbox_services ADD COLUMN pending_reason TEXT;
-- The newest tip of the followed branch a push or a poll named: a poll that finds the same
-- tip again triggers nothing.
ALTER TABLE sandbox_services ADD COLUMN seen_commit TEXT;
-- Who follows what: a push is matched by service and branch.
CREATE INDEX sandbox_services_followed ON sandbox_services (service, branch) WHERE follow = 1;

-- Every webhook delivery and every polling trigger, kept for 7 days: what came, whether its
-- signature held, and what it did (or why nothing). Never the body.
CREATE TABLE deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- webhook | poll
    source      TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    -- X-Request-Id (Bitbucket Server) or X-Hook-UUID (Cloud); NULL for polls and when absent.
    delivery_id TEXT,
    -- X-Event-Key: repo:refs_changed, repo:push, ...
    event       TEXT,
    -- The repository as the catalog knows it (normalized), NULL when it is not a catalog's.
    repository  TEXT,
    -- The catalog services of that repository, a JSON array of names.
    services    TEXT NOT NULL DEFAULT '[]',
    -- The refs it named, a JSON array of {branch, commit, change}.
    refs        TEXT NOT NULL DEFAULT '[]',
    -- valid | invalid | missing | none (a poll)
    signature   TEXT NOT NULL,
    outcome     TEXT NOT NULL
);
CREATE INDEX deliveries_newest_first ON deliveries (received_at DESC, id DESC);
CREATE INDEX deliveries_by_delivery_id ON deliveries (delivery_id) WHERE delivery_id IS NOT NULL;
