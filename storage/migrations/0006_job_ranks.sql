-- Rank groups: a training job may run as several btx-train processes (data parallel over c10d).
-- `ranks` is how many; a GPU job has one rank per GPU (ranks = gpus), a CPU job `ranks` CPU ranks.
-- Existing jobs, and every merge and eval job, are one rank. The claim functions need no change: a
-- job still fits a worker by its GPUs, and a CPU job's ranks share the one slot that claims it.
ALTER TABLE jobs ADD COLUMN ranks integer NOT NULL DEFAULT 1 CHECK (ranks >= 1);
