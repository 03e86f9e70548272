"""Shared test settings: the tests use tiny tensors, where one thread is fastest and immune to a busy machine."""
import torch

torch.set_num_threads(1)
