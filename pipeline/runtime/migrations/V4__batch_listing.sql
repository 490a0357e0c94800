-- The dashboard's batch list, newest first, pages by (created_at, batch_id):
-- an index seek however many batches there are.
CREATE INDEX batches_created ON batches (created_at, batch_id);
