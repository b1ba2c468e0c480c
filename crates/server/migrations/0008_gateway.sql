-- The gateway agent that runs a sandbox's own API gateway (a catalog service of
-- kind = "gateway"), beside the micro agent (`agent`) that runs its other services: its
-- teardown, sleep and wake go to both.
ALTER TABLE sandboxes ADD COLUMN gateway_agent TEXT;
