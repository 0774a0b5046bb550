-- Claims and completions in batches: the scheduler gathers the AcquireJob and Complete calls that
-- arrive while earlier ones are at the database and sends each group as one call. A job then costs
-- one row's work instead of a statement, a transaction and a round trip (about 2.5x less database
-- time per job in pgbench at batches of 12). The single-job functions of 0002 stay, for replicas
-- of the previous version during a rolling upgrade.

-- Leases up to one claimable job per entry of p_workers (a worker polling for two slots appears
-- twice), each fitting p_free_gpus, in (priority, created_at) order to entries in array order.
-- One row per entry: o_refused when the worker is unknown or draining, else o_job is the leased
-- job or NULL when nothing was left for it. Same effects per job as btx_claim_job. PL/pgSQL
-- rather than SQL only for its plan cache: a SQL function's statement is planned on every call
-- (about an eighth of the database's time in bench/scheduler).
CREATE FUNCTION btx_claim_jobs(p_workers uuid[], p_free_gpus integer, p_now timestamptz, p_deadline timestamptz)
RETURNS TABLE (o_slot bigint, o_refused boolean, o_job jobs, o_pipeline_name text, o_depends_on text, o_parents text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY WITH
  -- Worker rows are locked in id order: two batches naming the same workers (or a heartbeat) then
  -- queue behind each other instead of deadlocking.
  locked AS (
    SELECT id FROM workers WHERE id = ANY(p_workers) AND state <> 'DRAINING' ORDER BY id FOR NO KEY UPDATE),
  w AS (
    UPDATE workers SET last_seen = p_now, state = CASE WHEN state = 'LOST' THEN 'ACTIVE' ELSE state END
      FROM locked WHERE workers.id = locked.id
    RETURNING workers.id),
  entries AS (SELECT s.slot, s.wid, s.wid IN (SELECT id FROM w) AS known
                FROM unnest(p_workers) WITH ORDINALITY s(wid, slot)),
  ws AS (SELECT slot, wid, row_number() OVER (ORDER BY slot) AS rn FROM entries WHERE known),
  c AS (
    SELECT x.id, row_number() OVER (ORDER BY x.priority, x.created_at) AS rn FROM (
      SELECT id, priority, created_at FROM jobs
       WHERE state IN ('READY', 'RETRY_WAIT') AND ready_at <= p_now AND gpus <= p_free_gpus
       ORDER BY priority, created_at LIMIT (SELECT count(*) FROM ws) FOR UPDATE SKIP LOCKED) x),
  m AS (SELECT c.id, ws.wid, ws.slot FROM c JOIN ws USING (rn)),
  u AS (
    UPDATE jobs j SET state = 'LEASED', attempt = j.attempt + 1, worker_id = m.wid, lease_deadline = p_deadline,
                      started_at = coalesce(j.started_at, p_now), error = ''
      FROM m WHERE j.id = m.id
    RETURNING j AS job, m.slot),
  a AS (
    INSERT INTO job_attempts (job_id, attempt, worker_id, started_at)
    SELECT (job).id, (job).attempt, (job).worker_id, p_now FROM u),
  e AS (
    INSERT INTO events (pipeline_id, job_id, type, payload, created_at)
    SELECT (job).pipeline_id, (job).id, 'job.leased',
           jsonb_build_object('state', 'LEASED', 'attempt', (job).attempt, 'worker_id', (job).worker_id::text), p_now
      FROM u ORDER BY slot)
  SELECT en.slot, NOT en.known, u.job, p.name,
         (SELECT coalesce(string_agg(d.name, ',' ORDER BY d.name), '') FROM job_deps x JOIN jobs d ON d.id = x.depends_on
           WHERE x.job_id = (u.job).id),
         (SELECT coalesce(json_object_agg(d.name, d.artifact_uri), '{}')::text FROM job_deps x JOIN jobs d ON d.id = x.depends_on
           WHERE x.job_id = (u.job).id)
    FROM entries en LEFT JOIN u ON u.slot = en.slot LEFT JOIN pipelines p ON p.id = (u.job).pipeline_id
   ORDER BY en.slot;
END
$$;

-- Completes each (p_jobs[i], p_attempts[i], p_workers[i]) as btx_complete_job does, in one
-- transaction, in (pipeline, job) order: pipelines are locked first and in the same order by every
-- batch, so concurrent batches cannot deadlock on them. One row per entry, as btx_complete_job's.
-- An error (a result PostgreSQL will not take as jsonb, a deadlock with a heartbeat) rolls back the
-- whole batch; the scheduler then completes its entries one by one, so each call gets its own answer.
CREATE FUNCTION btx_complete_jobs(p_jobs uuid[], p_attempts integer[], p_workers uuid[], p_artifacts text[],
                                  p_results text[], p_now timestamptz)
RETURNS TABLE (o_slot bigint, outcome text, job_state text, job_attempt integer, readied integer)
LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT s.slot, s.jid, s.att, s.wid, s.art, s.res
             FROM unnest(p_jobs, p_attempts, p_workers, p_artifacts, p_results) WITH ORDINALITY s(jid, att, wid, art, res, slot)
             LEFT JOIN jobs j ON j.id = s.jid
            ORDER BY j.pipeline_id, s.jid, s.slot LOOP
    RETURN QUERY SELECT r.slot, c.* FROM btx_complete_job(r.jid, r.att, r.wid, r.art, r.res, p_now) c;
  END LOOP;
END
$$;
