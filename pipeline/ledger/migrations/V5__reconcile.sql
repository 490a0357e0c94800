-- The reconciler: PostgreSQL is the record of what must still happen, so what the
-- broker loses can be published again from here.
ALTER TABLE batches
    -- The extract job as submitted, to publish again when it is lost before or during ingest.
    ADD COLUMN job        jsonb,
    -- Times that job was published again (its message id carries the count).
    ADD COLUMN redrives   integer NOT NULL DEFAULT 0,
    -- When the reconciler found images pending and nothing of the batch in any stream.
    ADD COLUMN stalled_at timestamptz,
    -- Images the reconciler published again, in all.
    ADD COLUMN redriven   integer NOT NULL DEFAULT 0;
-- Times an image's job was published again (its messages' ids carry the count).
ALTER TABLE images ADD COLUMN redrives integer NOT NULL DEFAULT 0;
-- The reconciler's walk over the batches still running: a seek, however many batches are done.
CREATE INDEX batches_active ON batches (batch_id) WHERE status IN ('ingesting', 'processing');
