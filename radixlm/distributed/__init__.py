"""Tensor parallelism's process groups and collectives (torch.distributed: gloo on CPU, NCCL on
CUDA). See parallel_state.py."""
