-- The dashboard's batch list, newest first, pages by (created_at, batch_id):
-- an index seek however many batches there are.
CREATE INDEX batches_created ON batches (created_at, batch_id);
-- A batch's images of one status, in image order (results?status=, failures by
-- reason): a seek to the status, then the ids in order. It replaces the index
-- on (batch_id, status), which is its prefix.
CREATE INDEX images_batch_status_image ON images (batch_id, status, image_id);
DROP INDEX images_batch_status;
