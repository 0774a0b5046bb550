-- btx_complete_jobs, set-based: a batch of completions takes four statements instead of about
-- eight per job (0003 called btx_complete_job once per entry). Same signature, same rows and the
-- same effects per pipeline, events in the same order per pipeline, so replicas of the previous
-- version can call it during a rolling upgrade.
CREATE OR REPLACE FUNCTION btx_complete_jobs(p_jobs uuid[], p_attempts integer[], p_workers uuid[],
                                             p_artifacts text[], p_results text[], p_now timestamptz)
RETURNS TABLE (o_slot bigint, outcome text, job_state text, job_attempt integer, readied integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  v_pipelines uuid[];
BEGIN
  -- Pipelines first, in id order (the order of every other writer of a pipeline's jobs), then the
  -- jobs, in id order. Each later statement takes a new snapshot, so it sees the locked rows as
  -- they are now: nobody else can change them before this transaction ends.
  SELECT array_agg(l.id ORDER BY l.id) INTO v_pipelines FROM (
    SELECT p.id FROM pipelines p WHERE p.id IN (SELECT j.pipeline_id FROM jobs j WHERE j.id = ANY(p_jobs))
     ORDER BY p.id FOR NO KEY UPDATE) l;
  PERFORM 1 FROM jobs j WHERE j.id = ANY(p_jobs) ORDER BY j.id FOR UPDATE;

  RETURN QUERY WITH
  entries AS (
    SELECT s.slot, s.jid, s.att, s.wid, s.art, s.res
      FROM unnest(p_jobs, p_attempts, p_workers, p_artifacts, p_results) WITH ORDINALITY s(jid, att, wid, art, res, slot)),
  -- The current lease of each job, completed once: a repeat of the same completion in one batch
  -- is stale, as it would be one batch later.
  win AS (
    SELECT DISTINCT ON (en.jid) en.slot, en.jid, en.att, en.art, en.res, j.pipeline_id, j.name
      FROM entries en JOIN jobs j ON j.id = en.jid
     WHERE j.state = 'LEASED' AND j.attempt = en.att AND j.worker_id IS NOT DISTINCT FROM en.wid
     ORDER BY en.jid, en.slot),
  u AS (
    UPDATE jobs j SET state = 'SUCCEEDED', artifact_uri = win.art, result = NULLIF(win.res, '')::jsonb,
                      lease_deadline = NULL, finished_at = p_now
      FROM win WHERE j.id = win.jid),
  a AS (
    UPDATE job_attempts x SET outcome = 'SUCCEEDED', error = '', finished_at = p_now
      FROM win WHERE x.job_id = win.jid AND x.attempt = win.att),
  -- A dependent waits for one parent fewer per parent completed here. It is credited to the parent
  -- that comes last in the batch, the one whose completion would have readied it had the entries
  -- been completed one by one, and the events come in that order too.
  cnt AS (
    SELECT jd.job_id, count(*) AS n, (array_agg(win.jid ORDER BY win.slot DESC))[1] AS trigger
      FROM job_deps jd JOIN win ON win.jid = jd.depends_on GROUP BY jd.job_id),
  d AS (
    UPDATE jobs c SET deps_remaining = c.deps_remaining - cnt.n,
                      state = CASE WHEN c.deps_remaining = cnt.n AND c.state = 'PENDING' THEN 'READY' ELSE c.state END,
                      ready_at = CASE WHEN c.deps_remaining = cnt.n THEN p_now ELSE c.ready_at END
      FROM cnt WHERE c.id = cnt.job_id
    RETURNING c.id, c.state, cnt.trigger),
  e AS (
    INSERT INTO events (pipeline_id, job_id, type, payload, created_at)
    SELECT x.pipeline_id, x.id, x.type, x.payload, p_now FROM (
      SELECT win.pipeline_id, win.slot, 0 AS ord, win.jid AS id, 'job.succeeded' AS type,
             jsonb_build_object('state', 'SUCCEEDED', 'attempt', win.att, 'message', win.art) AS payload FROM win
      UNION ALL
      SELECT win.pipeline_id, win.slot, 1, d.id, 'job.ready', '{"state": "READY"}'::jsonb
        FROM d JOIN win ON win.jid = d.trigger WHERE d.state = 'READY') x
    ORDER BY x.slot, x.ord, x.id),
  r AS (
    UPDATE pipelines p SET result = coalesce(p.result, '{}'::jsonb) || g.obj
      FROM (SELECT pipeline_id, jsonb_object_agg(name, res::jsonb ORDER BY slot) AS obj
              FROM win WHERE res <> '' GROUP BY pipeline_id) g
     WHERE p.id = g.pipeline_id)
  SELECT en.slot,
         CASE WHEN j.id IS NULL THEN 'not_found' WHEN w.jid IS NOT NULL THEN 'ok' ELSE 'stale' END,
         -- A repeat of a completed entry is stale, but sees the job as this batch leaves it.
         CASE WHEN j.id IS NULL THEN '' WHEN en.jid IN (SELECT jid FROM win) THEN 'SUCCEEDED' ELSE j.state END,
         CASE WHEN j.id IS NULL THEN 0 ELSE j.attempt END,
         CASE WHEN w.jid IS NULL THEN 0
              ELSE (SELECT count(*)::integer FROM d WHERE d.trigger = w.jid AND d.state = 'READY') END
    FROM entries en LEFT JOIN jobs j ON j.id = en.jid LEFT JOIN win w ON w.slot = en.slot
   ORDER BY en.slot;

  -- A new statement, so a new snapshot that sees the jobs completed above: under the pipeline locks,
  -- a pipeline whose jobs have all succeeded is finished here, once. (A pipeline of a stale entry is
  -- looked at too; it is still RUNNING only while some job of it has not succeeded.)
  WITH p AS (
    UPDATE pipelines SET state = 'SUCCEEDED', updated_at = p_now
     WHERE id = ANY(v_pipelines) AND state = 'RUNNING'
       AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.pipeline_id = pipelines.id AND jobs.state <> 'SUCCEEDED')
    RETURNING id)
  INSERT INTO events (pipeline_id, job_id, type, payload, created_at)
  SELECT p.id, NULL, 'pipeline.succeeded', '{"pipeline_state": "SUCCEEDED"}'::jsonb, p_now FROM p ORDER BY p.id;
END
$$;
