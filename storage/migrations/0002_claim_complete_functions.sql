-- The two hot paths of the lease protocol as server-side functions: a claim or a completion is one
-- round trip instead of ten, and the plans of the few statements inside are cached per connection.
-- Store::ClaimJob and Store::CompleteJob call them; the semantics are the ones documented there.
--
-- Neither sends NOTIFY: PostgreSQL serialises the commits of all notifying transactions on one
-- lock, which capped a busy scheduler at a fraction of the database's speed. The scheduler sends
-- the wake-ups itself, coalesced (see WakeUps in scheduler/include/btx/scheduler/server.h).

-- "Does this pipeline still have an unfinished job?" stops at the first index entry instead of
-- visiting every job of the pipeline.
CREATE INDEX jobs_unfinished ON jobs (pipeline_id) WHERE state <> 'SUCCEEDED';
-- The unique (pipeline_id, name) index serves every lookup by pipeline; one index fewer to update on
-- each of the two state changes of every job.
DROP INDEX jobs_pipeline;
-- The metrics refresh reads the newest finished evaluations (routing shares) every few seconds.
CREATE INDEX jobs_eval_finished ON jobs (finished_at DESC) WHERE kind = 'eval' AND state = 'SUCCEEDED';

-- Leases the first claimable job that fits p_free_gpus to p_worker (FOR UPDATE SKIP LOCKED, so
-- concurrent claims never wait for each other) and records the attempt and the job.leased event.
-- Returns the leased row with what the worker needs besides (its pipeline's name, its parents'
-- names and artifact URIs), all read here: a query around the call would read with a snapshot
-- older than the claim. No row when nothing is claimable. Raises BX001 when the worker is unknown
-- or draining. A LOST worker that claims again is evidently alive: it becomes ACTIVE.
CREATE FUNCTION btx_claim_job(p_worker uuid, p_free_gpus integer, p_now timestamptz, p_deadline timestamptz)
RETURNS TABLE (o_job jobs, o_pipeline_name text, o_depends_on text, o_parents text) LANGUAGE plpgsql AS $$
DECLARE
  v_job jobs%ROWTYPE;
BEGIN
  UPDATE workers SET last_seen = p_now, state = CASE WHEN state = 'LOST' THEN 'ACTIVE' ELSE state END
   WHERE id = p_worker AND state <> 'DRAINING';
  IF NOT FOUND THEN
    RAISE EXCEPTION 'worker ''%'' is unknown or draining', p_worker USING ERRCODE = 'BX001';
  END IF;
  WITH c AS (
    SELECT id FROM jobs
     WHERE state IN ('READY', 'RETRY_WAIT') AND ready_at <= p_now AND gpus <= p_free_gpus
     ORDER BY priority, created_at LIMIT 1 FOR UPDATE SKIP LOCKED),
  u AS (
    UPDATE jobs j SET state = 'LEASED', attempt = j.attempt + 1, worker_id = p_worker, lease_deadline = p_deadline,
                      started_at = coalesce(j.started_at, p_now), error = ''
      FROM c WHERE j.id = c.id
    RETURNING j.*),
  a AS (
    INSERT INTO job_attempts (job_id, attempt, worker_id, started_at) SELECT id, attempt, p_worker, p_now FROM u),
  e AS (
    INSERT INTO events (pipeline_id, job_id, type, payload, created_at)
    SELECT pipeline_id, id, 'job.leased',
           jsonb_build_object('state', 'LEASED', 'attempt', attempt, 'worker_id', p_worker::text), p_now FROM u)
  SELECT * INTO v_job FROM u;
  IF v_job.id IS NULL THEN
    RETURN;
  END IF;
  o_job := v_job;
  SELECT p.name,
         (SELECT coalesce(string_agg(d.name, ',' ORDER BY d.name), '') FROM job_deps x JOIN jobs d ON d.id = x.depends_on
           WHERE x.job_id = v_job.id),
         (SELECT coalesce(json_object_agg(d.name, d.artifact_uri), '{}')::text FROM job_deps x JOIN jobs d ON d.id = x.depends_on
           WHERE x.job_id = v_job.id)
    INTO o_pipeline_name, o_depends_on, o_parents
    FROM pipelines p WHERE p.id = v_job.pipeline_id;
  RETURN NEXT;
END
$$;

-- Completes attempt p_attempt of p_job for p_worker. Locks the pipeline first, then the job (the
-- lock order of every multi-row transaction, see storage/store_internal.h).
-- Returns ('ok', 'SUCCEEDED', p_attempt, jobs made READY), ('not_found', '', 0, 0), or
-- ('stale', state, attempt, 0) with the job's current state and attempt when (p_job, p_attempt,
-- p_worker) is not the current lease; only 'ok' changes anything.
CREATE FUNCTION btx_complete_job(p_job uuid, p_attempt integer, p_worker uuid, p_artifact text, p_result text,
                                 p_now timestamptz)
RETURNS TABLE (outcome text, job_state text, job_attempt integer, readied integer) LANGUAGE plpgsql AS $$
DECLARE
  v_pipeline uuid;
  v_job record;
  v_ready integer;
BEGIN
  SELECT p.id INTO v_pipeline FROM pipelines p WHERE p.id = (SELECT pipeline_id FROM jobs WHERE id = p_job)
    FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'not_found'::text, ''::text, 0, 0;
    RETURN;
  END IF;
  SELECT name, state, attempt, worker_id INTO v_job FROM jobs WHERE id = p_job FOR UPDATE;
  IF v_job.state <> 'LEASED' OR v_job.attempt <> p_attempt OR v_job.worker_id IS DISTINCT FROM p_worker THEN
    RETURN QUERY SELECT 'stale'::text, v_job.state, v_job.attempt, 0;
    RETURN;
  END IF;
  -- The job, its attempt, its dependents (one parent fewer to wait for; READY when this was the
  -- last) and the events, in that order of event ids.
  WITH u AS (
    UPDATE jobs SET state = 'SUCCEEDED', artifact_uri = p_artifact, result = NULLIF(p_result, '')::jsonb,
                    lease_deadline = NULL, finished_at = p_now
     WHERE id = p_job
    RETURNING id),
  a AS (
    UPDATE job_attempts SET outcome = 'SUCCEEDED', error = '', finished_at = p_now
     WHERE job_id = p_job AND attempt = p_attempt),
  d AS (
    UPDATE jobs c SET deps_remaining = c.deps_remaining - 1,
                      state = CASE WHEN c.deps_remaining = 1 AND c.state = 'PENDING' THEN 'READY' ELSE c.state END,
                      ready_at = CASE WHEN c.deps_remaining = 1 THEN p_now ELSE c.ready_at END
     WHERE c.id IN (SELECT job_id FROM job_deps WHERE depends_on = p_job)
    RETURNING c.id, c.state),
  e AS (
    INSERT INTO events (pipeline_id, job_id, type, payload, created_at)
    SELECT v_pipeline, x.id, x.type, x.payload, p_now FROM (
      SELECT 0 AS ord, u.id, 'job.succeeded' AS type,
             jsonb_build_object('state', 'SUCCEEDED', 'attempt', p_attempt, 'message', p_artifact) AS payload FROM u
      UNION ALL
      SELECT 1, d.id, 'job.ready', '{"state": "READY"}'::jsonb FROM d WHERE d.state = 'READY') x
    ORDER BY x.ord, x.id)
  SELECT count(*) INTO v_ready FROM d WHERE d.state = 'READY';
  IF p_result <> '' THEN
    UPDATE pipelines SET result = coalesce(result, '{}'::jsonb) || jsonb_build_object(v_job.name, p_result::jsonb)
     WHERE id = v_pipeline;
  END IF;
  -- A new statement, so a new snapshot: under the pipeline lock it sees every sibling that
  -- completed before, and the last one to complete finishes the pipeline.
  IF NOT EXISTS (SELECT 1 FROM jobs WHERE pipeline_id = v_pipeline AND state <> 'SUCCEEDED') THEN
    WITH p AS (
      UPDATE pipelines SET state = 'SUCCEEDED', updated_at = p_now WHERE id = v_pipeline AND state = 'RUNNING' RETURNING id)
    INSERT INTO events (pipeline_id, job_id, type, payload, created_at)
    SELECT p.id, NULL, 'pipeline.succeeded', '{"pipeline_state": "SUCCEEDED"}'::jsonb, p_now FROM p;
  END IF;
  RETURN QUERY SELECT 'ok'::text, 'SUCCEEDED'::text, p_attempt, v_ready;
END
$$;
