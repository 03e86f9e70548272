"""Helpers shared by the test files."""
import torch


def randomized(model, seed=0, std=0.2):
    """Random weights: the zero-initialised layers would make gradients and attention outputs vanish."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=std)
    return model
