-- Tenancy: a pipeline belongs to the principal that submitted it ('' without authentication, the
-- one anonymous owner of plaintext loopback mode), and idempotency keys are scoped per owner.
ALTER TABLE pipelines ADD COLUMN owner text NOT NULL DEFAULT '';
ALTER TABLE pipelines DROP CONSTRAINT pipelines_idempotency_key_key;
CREATE UNIQUE INDEX pipelines_owner_idempotency_key ON pipelines (owner, idempotency_key);
CREATE INDEX pipelines_owner_created ON pipelines (owner, created_at DESC, id DESC);
