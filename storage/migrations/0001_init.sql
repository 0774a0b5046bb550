-- Initial schema. Times are timestamptz written by the scheduler from its (injectable) clock, so
-- lease and backoff logic is testable without waiting.
CREATE TABLE pipelines (
  id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name             text NOT NULL,
  state            text NOT NULL,
  spec             jsonb NOT NULL,
  idempotency_key  text UNIQUE,
  error            text NOT NULL DEFAULT '',
  result           jsonb,
  cancel_requested boolean NOT NULL DEFAULT false,
  created_at       timestamptz NOT NULL,
  updated_at       timestamptz NOT NULL
);
CREATE INDEX pipelines_created ON pipelines (created_at DESC, id DESC);

CREATE TABLE workers (
  id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name          text NOT NULL UNIQUE,
  hostname      text NOT NULL,
  capabilities  jsonb NOT NULL,
  version       text NOT NULL DEFAULT '',
  state         text NOT NULL,
  registered_at timestamptz NOT NULL,
  last_seen     timestamptz NOT NULL
);

CREATE TABLE jobs (
  id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  pipeline_id      uuid NOT NULL REFERENCES pipelines(id) ON DELETE CASCADE,
  name             text NOT NULL,
  kind             text NOT NULL,
  state            text NOT NULL,
  attempt          integer NOT NULL DEFAULT 0,
  max_attempts     integer NOT NULL,
  spec             jsonb NOT NULL,
  deps_remaining   integer NOT NULL,
  gpus             integer NOT NULL DEFAULT 0,
  priority         integer NOT NULL DEFAULT 0,
  worker_id        uuid REFERENCES workers(id),
  lease_deadline   timestamptz,
  ready_at         timestamptz,
  checkpoint_uri   text NOT NULL DEFAULT '',
  artifact_uri     text NOT NULL DEFAULT '',
  error            text NOT NULL DEFAULT '',
  progress         jsonb NOT NULL DEFAULT '{}',
  result           jsonb,
  cancel_requested boolean NOT NULL DEFAULT false,
  created_at       timestamptz NOT NULL,
  started_at       timestamptz,
  finished_at      timestamptz,
  UNIQUE (pipeline_id, name)
);
-- The claim query scans READY jobs in priority order; a partial index keeps it small.
CREATE INDEX jobs_claimable ON jobs (priority, created_at) WHERE state IN ('READY', 'RETRY_WAIT');
CREATE INDEX jobs_leased ON jobs (lease_deadline) WHERE state = 'LEASED';
CREATE INDEX jobs_pipeline ON jobs (pipeline_id);

CREATE TABLE job_deps (
  job_id     uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  depends_on uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  PRIMARY KEY (job_id, depends_on)
);
CREATE INDEX job_deps_parent ON job_deps (depends_on);

-- One row per attempt: the audit trail that proves no attempt completed twice.
CREATE TABLE job_attempts (
  job_id      uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  attempt     integer NOT NULL,
  worker_id   uuid REFERENCES workers(id),
  started_at  timestamptz NOT NULL,
  finished_at timestamptz,
  outcome     text NOT NULL DEFAULT 'RUNNING',
  error       text NOT NULL DEFAULT '',
  PRIMARY KEY (job_id, attempt)
);

CREATE TABLE events (
  id          bigserial PRIMARY KEY,
  pipeline_id uuid NOT NULL REFERENCES pipelines(id) ON DELETE CASCADE,
  job_id      uuid,
  type        text NOT NULL,
  payload     jsonb NOT NULL DEFAULT '{}',
  created_at  timestamptz NOT NULL
);
CREATE INDEX events_pipeline ON events (pipeline_id, id);

CREATE TABLE job_logs (
  id         bigserial PRIMARY KEY,
  job_id     uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  attempt    integer NOT NULL,
  stream     text NOT NULL,
  line       text NOT NULL,
  created_at timestamptz NOT NULL
);
CREATE INDEX job_logs_job ON job_logs (job_id, id);

CREATE TABLE job_metrics (
  job_id            uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  attempt           integer NOT NULL,
  step              bigint NOT NULL,
  loss              double precision,
  tokens_per_second double precision,
  learning_rate     double precision,
  created_at        timestamptz NOT NULL,
  PRIMARY KEY (job_id, attempt, step)
);
