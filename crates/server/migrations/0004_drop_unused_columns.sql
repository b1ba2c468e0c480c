-- Never read: whether an agent is connected is the hub's to say, and the event log's
-- position is the log file's.
ALTER TABLE agents DROP COLUMN connected;
ALTER TABLE deployments DROP COLUMN last_seq;
