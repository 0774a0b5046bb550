-- Bounded logs and events (docs/reliability.md, "Logs and events stay bounded").
-- A log line carries the seq its worker gave it (1, 2, ... per attempt); a re-sent heartbeat repeats
-- seqs, and the unique index makes the repeat a no-op (INSERT ... ON CONFLICT DO NOTHING). Seq 0 is a
-- worker's "lines dropped" notice, and every row written before this migration: never deduplicated.
ALTER TABLE job_logs ADD COLUMN seq bigint NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX job_logs_attempt_seq ON job_logs (job_id, attempt, seq) WHERE seq > 0;
-- The latest progress stays in jobs.progress (updated in place by every heartbeat); a job.progress
-- event is written at most once per interval per job, and at once for a new attempt. These say
-- when, and for which attempt, the last one was written.
ALTER TABLE jobs ADD COLUMN progress_event_at timestamptz;
ALTER TABLE jobs ADD COLUMN progress_event_attempt integer;
-- The per-pipeline cap counts and deletes a pipeline's job events (never its pipeline.* events) oldest
-- first: this index answers both without reading the table.
CREATE INDEX events_pipeline_job ON events (pipeline_id, id) WHERE job_id IS NOT NULL;
