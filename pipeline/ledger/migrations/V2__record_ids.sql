-- The caller's own id for an image given by URL (add-images' `recordId`), kept on its outcome.
ALTER TABLE images ADD COLUMN record_id text;
