-- Batches and their images. Progress counters live on the batch row and are
-- only ever changed in the same transaction that moves an image out of
-- 'pending', so a redelivered outcome cannot count twice.
CREATE TABLE batches (
    batch_id        text PRIMARY KEY,
    project_id      text NOT NULL,
    priority        smallint NOT NULL DEFAULT 5,
    source          text NOT NULL,
    -- ingesting -> processing -> completed, or failed when the archive itself is unusable
    status          text NOT NULL DEFAULT 'ingesting',
    image_count     integer,            -- known once extract has read the whole archive
    skipped_count   integer NOT NULL DEFAULT 0,
    skipped_entries jsonb NOT NULL DEFAULT '[]',
    processed       integer NOT NULL DEFAULT 0,  -- images with a terminal outcome
    failed          integer NOT NULL DEFAULT 0,
    faces           integer NOT NULL DEFAULT 0,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz
);

CREATE TABLE images (
    batch_id      text NOT NULL REFERENCES batches (batch_id) ON DELETE CASCADE,
    image_id      text NOT NULL,
    entry_name    text NOT NULL,
    original_key  text,
    -- pending, then exactly one of cropped / no_face / failed
    status        text NOT NULL DEFAULT 'pending',
    width         integer,
    height        integer,
    faces         jsonb NOT NULL DEFAULT '[]',
    crop_keys     text[] NOT NULL DEFAULT '{}',
    detector      text,
    error         text,
    failed_stage  text,
    attempts      integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, image_id)
);

CREATE INDEX images_batch_status ON images (batch_id, status);
