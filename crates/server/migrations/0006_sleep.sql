-- Sleep and wake (issue 11): when each sandbox was last in use, so that one idle past
-- `idle_after` sleeps. Unix ms, control plane's clock. A routed request (the gateway agents'
-- `activity`), the end of a deployment and a wake count as use.
ALTER TABLE sandboxes ADD COLUMN last_active_at INTEGER NOT NULL DEFAULT 0;
-- Nothing recorded the requests of sandboxes that live at the upgrade: they count as used
-- now, rather than all falling asleep at once.
UPDATE sandboxes SET last_active_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER);
-- The sleep loop's question: ready sandboxes by their last use.
CREATE INDEX sandboxes_by_last_use ON sandboxes (state, last_active_at);
