-- 0002: the manifest outbox. A manifest is recorded (its generation, its exact signed bytes) in the
-- same transaction as the member's step, before it is published; the column is cleared once the
-- broker has acknowledged it. A driver that dies in between leaves it set, and whichever replica
-- drives the deployment next publishes those same bytes again: never a second generation for the
-- same step, never a step recorded without its manifest reaching the broker. The agent takes the
-- same bytes twice as one message (it compares their sha256), so the republish is harmless.
--
-- Portable as written: ADD COLUMN with no default and no constraint runs the same on SQLite and
-- PostgreSQL. The envelope is JSON (UTF-8) text.

ALTER TABLE deployment_devices ADD COLUMN outbox TEXT;
