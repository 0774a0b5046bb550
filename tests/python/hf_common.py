"""What the transformers checks share: the tolerance and how two sets of logits are compared, and the
perturbation that keeps transformers' all-ones norms and all-zero biases from hiding a mix-up."""
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
