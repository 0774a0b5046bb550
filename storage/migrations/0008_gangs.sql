-- Gangs: a job may span several workers (resources.nodes_per_job; docs/reliability.md "Gangs"). It is
-- leased to all of its `nodes` workers in one transaction or to none, and every member shares the
-- attempt. How a gang finds its workers, without partial holds:
--  * An idle worker whose poll found no single-worker job offers itself (workers.offer_until: until when
--    its long poll waits, offer_gpus: its free GPUs then). An offer is no hold: any claim clears it.
--  * The head gang (btx_head_gang) is formed from offers as soon as enough fit: all members leased,
--    their offers cleared, in one transaction (btx_offer_gang). Until then it reserves: a worker that
--    could serve it takes no single-worker job queued after it (btx_claim_jobs), so a stream of small
--    jobs cannot starve it. Only the head gang forms, so two gangs never split the fleet between them.
--  * Each member's worker picks its lease up on its next poll (btx_take_member_lease).
ALTER TABLE jobs ADD COLUMN nodes integer NOT NULL DEFAULT 1 CHECK (nodes >= 1),
                 ADD COLUMN rendezvous text NOT NULL DEFAULT '';
ALTER TABLE workers ADD COLUMN offer_gpus integer,
                    ADD COLUMN offer_until timestamptz,
                    -- members leased to this worker that it has not picked up yet: it takes nothing else meanwhile
                    ADD COLUMN undelivered_members integer NOT NULL DEFAULT 0,
                    ADD COLUMN cap_gpus integer GENERATED ALWAYS AS (
                      CASE WHEN jsonb_typeof(capabilities->'gpus') = 'number'
                           THEN least(greatest((capabilities->>'gpus')::numeric, 0), 2147483647)::integer ELSE 0 END) STORED;

-- One row per member per attempt. A member's lease is its own; jobs.lease_deadline is the earliest of
-- the current attempt's, so the reaper ends the attempt when any member stops heartbeating.
CREATE TABLE job_members (
  job_id         uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  attempt        integer NOT NULL,
  node_rank      integer NOT NULL,
  worker_id      uuid NOT NULL REFERENCES workers(id),
  lease_deadline timestamptz NOT NULL,
  delivered      boolean NOT NULL DEFAULT false,
  PRIMARY KEY (job_id, attempt, node_rank),
  UNIQUE (job_id, attempt, worker_id)
);
CREATE INDEX job_members_undelivered ON job_members (worker_id) WHERE NOT delivered;
CREATE INDEX jobs_gang_claimable ON jobs (priority, created_at) WHERE state IN ('READY', 'RETRY_WAIT') AND nodes > 1;

-- The gang that forms next and reserves meanwhile: the first claimable gang job in (priority,
-- created_at) order that the fleet can serve at all (at least `nodes` ACTIVE workers with its GPUs). One
-- the fleet cannot serve (workers lost) waits without holding anything up.
CREATE FUNCTION btx_head_gang(p_now timestamptz)
RETURNS TABLE (id uuid, priority integer, created_at timestamptz, gpus integer, nodes integer)
LANGUAGE sql STABLE AS $$
  SELECT j.id, j.priority, j.created_at, j.gpus, j.nodes FROM jobs j
   WHERE j.state IN ('READY', 'RETRY_WAIT') AND j.ready_at <= p_now AND j.nodes > 1
     AND (SELECT count(*) FROM workers w WHERE w.state = 'ACTIVE' AND w.cap_gpus >= j.gpus) >= j.nodes
   ORDER BY j.priority, j.created_at LIMIT 1
$$;

-- As in 0003, plus: gang jobs are never claimed here; a worker with a member lease to pick up gets
-- nothing; every polled worker's offer is cleared (it is busy or polls again); and while a head gang
-- waits, entries whose worker could serve it (cap_gpus >= its GPUs per node) only get jobs queued
-- before it, the others any job. Jobs go in (priority, created_at) order: those before the head gang
-- to reserved entries first, then to the others, then the rest to the others that are left.
-- o_note, for an entry that got no job: 'members' (a member lease waits for its worker:
-- btx_take_member_lease), 'gang' (it could serve the waiting head gang: btx_offer_gang), else ''.
DROP FUNCTION btx_claim_jobs(uuid[], integer, timestamptz, timestamptz);
CREATE FUNCTION btx_claim_jobs(p_workers uuid[], p_free_gpus integer, p_now timestamptz, p_deadline timestamptz)
RETURNS TABLE (o_slot bigint, o_refused boolean, o_job jobs, o_pipeline_name text, o_depends_on text, o_parents text,
               o_note text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  v_head uuid;
  v_head_priority integer;
  v_head_created timestamptz;
  v_head_gpus integer;
BEGIN
  SELECT h.id, h.priority, h.created_at, h.gpus INTO v_head, v_head_priority, v_head_created, v_head_gpus
    FROM btx_head_gang(p_now) h;
  RETURN QUERY WITH
  locked AS (
    SELECT id, undelivered_members AS und, cap_gpus AS cap FROM workers
     WHERE id = ANY(p_workers) AND state <> 'DRAINING' ORDER BY id FOR NO KEY UPDATE),
  w AS (
    UPDATE workers SET last_seen = p_now, state = CASE WHEN state = 'LOST' THEN 'ACTIVE' ELSE state END,
                       offer_until = NULL
      FROM locked WHERE workers.id = locked.id
    RETURNING workers.id, locked.und, locked.cap),
  entries AS (
    SELECT s.slot, s.wid, w.id IS NOT NULL AS known, coalesce(w.und, 0) = 0 AS free_of_members,
           v_head IS NOT NULL AND coalesce(w.cap, 0) >= v_head_gpus AS reserved
      FROM unnest(p_workers) WITH ORDINALITY s(wid, slot) LEFT JOIN w ON w.id = s.wid),
  ws AS (SELECT slot, wid, row_number() OVER (ORDER BY reserved DESC, slot) AS rn
           FROM entries WHERE known AND free_of_members),
  nr AS (SELECT (SELECT count(*) FROM ws) AS n,
                (SELECT count(*) FROM entries WHERE known AND free_of_members AND reserved) AS r),
  cb AS (
    SELECT x.id, row_number() OVER (ORDER BY x.priority, x.created_at) AS rn FROM (
      SELECT id, priority, created_at FROM jobs
       WHERE state IN ('READY', 'RETRY_WAIT') AND ready_at <= p_now AND gpus <= p_free_gpus AND nodes = 1
         AND (v_head IS NULL OR (priority, created_at) < (v_head_priority, v_head_created))
       ORDER BY priority, created_at LIMIT (SELECT n FROM nr) FOR UPDATE SKIP LOCKED) x),
  nb AS (SELECT count(*) AS b FROM cb),
  ca AS (
    SELECT x.id, (SELECT greatest(b, r) FROM nb, nr) + row_number() OVER (ORDER BY x.priority, x.created_at) AS rn FROM (
      SELECT id, priority, created_at FROM jobs
       WHERE v_head IS NOT NULL AND state IN ('READY', 'RETRY_WAIT') AND ready_at <= p_now AND gpus <= p_free_gpus
         AND nodes = 1 AND (priority, created_at) >= (v_head_priority, v_head_created)
       ORDER BY priority, created_at
       LIMIT (SELECT greatest(0, (n - r) - greatest(0, b - r)) FROM nb, nr) FOR UPDATE SKIP LOCKED) x),
  c AS (SELECT id, rn FROM cb UNION ALL SELECT id, rn FROM ca),
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
           WHERE x.job_id = (u.job).id),
         CASE WHEN NOT en.known THEN '' WHEN NOT en.free_of_members THEN 'members' WHEN en.reserved THEN 'gang' ELSE '' END
    FROM entries en LEFT JOIN u ON u.slot = en.slot LEFT JOIN pipelines p ON p.id = (u.job).pipeline_id
   ORDER BY en.slot;
END
$$;

-- The worker offers itself to gangs (it is idle and polls until p_offer_until with p_free_gpus free)
-- and, when the head gang now has enough offers that fit, forms it: the job LEASED at a new attempt
-- with the caller as node 0 when it fits (it is awake to start the rendezvous store at once), the
-- other members in id order, every member's offer cleared, in one transaction; otherwise nothing
-- but the offer changes. Rows are taken with SKIP LOCKED: a worker locked by a claim or a heartbeat
-- is not idle for this gang, and waiting for it could deadlock with a heartbeat holding it.
-- Returns the gang's job, the caller's node rank (NULL: not a member) and whether a gang formed.
CREATE FUNCTION btx_offer_gang(p_worker uuid, p_free_gpus integer, p_offer_until timestamptz, p_now timestamptz,
                               p_deadline timestamptz)
RETURNS TABLE (o_job uuid, o_node_rank integer)
LANGUAGE plpgsql AS $$
DECLARE
  v_head uuid;
  v_head_gpus integer;
  v_head_nodes integer;
  v_members uuid[];
  v_attempt integer;
  v_pipeline uuid;
BEGIN
  UPDATE workers SET offer_gpus = p_free_gpus, offer_until = p_offer_until, last_seen = p_now
   WHERE id = p_worker AND state = 'ACTIVE' AND undelivered_members = 0;
  SELECT h.id, h.gpus, h.nodes INTO v_head, v_head_gpus, v_head_nodes FROM btx_head_gang(p_now) h;
  IF v_head IS NULL THEN RETURN; END IF;
  SELECT pipeline_id, attempt + 1 INTO v_pipeline, v_attempt FROM jobs
   WHERE id = v_head AND state IN ('READY', 'RETRY_WAIT') FOR UPDATE SKIP LOCKED;
  IF NOT FOUND THEN RETURN; END IF;
  SELECT array_agg(x.id ORDER BY x.id <> p_worker, x.id) INTO v_members FROM (
    SELECT id FROM workers
     WHERE state = 'ACTIVE' AND offer_until >= p_now AND offer_gpus >= v_head_gpus AND undelivered_members = 0
     ORDER BY id <> p_worker, id LIMIT v_head_nodes FOR NO KEY UPDATE SKIP LOCKED) x;
  IF coalesce(array_length(v_members, 1), 0) < v_head_nodes THEN RETURN; END IF;
  UPDATE jobs SET state = 'LEASED', attempt = v_attempt, worker_id = v_members[1], lease_deadline = p_deadline,
                  started_at = coalesce(started_at, p_now), error = '', rendezvous = ''
   WHERE id = v_head;
  INSERT INTO job_members (job_id, attempt, node_rank, worker_id, lease_deadline, delivered)
  SELECT v_head, v_attempt, (u.n - 1)::integer, u.m, p_deadline, u.m = p_worker
    FROM unnest(v_members) WITH ORDINALITY u(m, n);
  UPDATE workers SET offer_until = NULL,
                     undelivered_members = undelivered_members + CASE WHEN id = p_worker THEN 0 ELSE 1 END
   WHERE id = ANY(v_members);
  INSERT INTO job_attempts (job_id, attempt, worker_id, started_at) VALUES (v_head, v_attempt, v_members[1], p_now);
  INSERT INTO events (pipeline_id, job_id, type, payload, created_at)
  VALUES (v_pipeline, v_head, 'job.leased',
          jsonb_build_object('state', 'LEASED', 'attempt', v_attempt, 'worker_id', v_members[1]::text,
                             'members', (SELECT jsonb_agg(m::text ORDER BY n) FROM unnest(v_members) WITH ORDINALITY u(m, n))),
          p_now);
  -- The other members' polls wake up and pick their leases up.
  PERFORM pg_notify('btx_gangs', '');
  RETURN QUERY SELECT v_head, (array_position(v_members, p_worker) - 1)::integer;
END
$$;

-- The member leases formed for this worker by another worker's offer: marked delivered, the worker
-- free to take work again. Returns the one whose attempt is still current (none when it ended meanwhile).
CREATE FUNCTION btx_take_member_lease(p_worker uuid, p_now timestamptz)
RETURNS TABLE (o_job uuid, o_node_rank integer)
LANGUAGE plpgsql AS $$
BEGIN
  -- The worker row first, the lock order of claims and of btx_offer_gang; a gang cannot add a member
  -- for it meanwhile, so every undelivered one is taken here.
  PERFORM 1 FROM workers WHERE id = p_worker AND undelivered_members > 0 FOR NO KEY UPDATE;
  IF NOT FOUND THEN RETURN; END IF;
  RETURN QUERY WITH
  d AS (
    UPDATE job_members m SET delivered = true WHERE m.worker_id = p_worker AND NOT m.delivered
    RETURNING m.job_id, m.node_rank, m.attempt),
  w AS (UPDATE workers SET undelivered_members = 0, last_seen = p_now WHERE id = p_worker)
  SELECT d.job_id, d.node_rank FROM d JOIN jobs j ON j.id = d.job_id
   WHERE j.state = 'LEASED' AND j.attempt = d.attempt ORDER BY d.job_id LIMIT 1;
END
$$;
