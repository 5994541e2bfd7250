"""Helpers shared by the parity tests against the PyTorch reference modules."""
import numpy as np
import torch


def noisy(model, seed):
    """HF's std-0.02 init hides errors under tiny activations: perturb every weight."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def rel_err(ours, ref):
    """max |ours - ref| / max |ref| (shapes must agree)."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
