"""What the transformers checks share: the tolerance and how two sets of logits are compared, the
perturbation that keeps transformers' all-ones norms and all-zero biases from hiding a mix-up, and how a
btx-train job is run."""
import json
import os
import subprocess

import torch

RTOL = 1e-4


def compare(what, ours, theirs):
    """max |ours - theirs| / max |theirs| within RTOL; prints the figure either way."""
    rel = (ours - theirs).abs().max().item() / theirs.abs().max().item()
    ok = rel <= RTOL
    print(f"{what}: max relative difference {rel:.2e} ({'ok' if ok else 'MISMATCH'})")
    return ok


def randomize_vectors(model, seed):
    """Adds noise to every 1-d parameter (norm weights, biases): transformers initialises them to 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def run_job(train, workdir, name, kind, spec, expect=0):
    """Runs one btx-train job into workdir/name; (that directory, stderr), or (None, stderr) when the exit code
    is not `expect`."""
    out = os.path.join(workdir, name)
    job = {"kind": kind, "output_dir": out, "checkpoint_dir": os.path.join(workdir, "ckpt", name), "threads": 2,
           "spec": spec}
    path = out + ".job.json"
    with open(path, "w") as f:
        json.dump(job, f)
    r = subprocess.run([train, "--job", path, "--progress-fd", "-1"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != expect:
        print(f"{name}: btx-train exited {r.returncode}, expected {expect}:\n{r.stderr}")
        return None, r.stderr
    return out, r.stderr
