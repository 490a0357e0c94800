-- Retention: when the sweeper last removed each kind of a batch's objects. A
-- batch completed again later (a replayed failure) is swept again.
ALTER TABLE batches
    ADD COLUMN upload_swept_at    timestamptz,
    ADD COLUMN originals_swept_at timestamptz,
    ADD COLUMN crops_swept_at     timestamptz;
-- The sweeper's question, "which completed batches are old enough", without a scan.
CREATE INDEX batches_completed_at ON batches (completed_at) WHERE status = 'completed';
-- Failures per stage (`pipeline stats`) read only the failed images, not every image.
CREATE INDEX images_failed_stage ON images (failed_stage) WHERE status = 'failed';
