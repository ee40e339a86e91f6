"""A stand-in for lightning's Fabric with the members SUPREME's methods use, for one CPU process; it
records what was called.  Used by the tests of jit_unlearn.integrations.supreme."""

import torch


class StandInFabric:
    """`setup`, `backward`, `all_reduce`, `barrier`, `print`, `device`, `global_rank` (and
    `broadcast`, for SUPREME's own assd); `calls` and `printed` record what was called and printed."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.global_rank = 0
        self.world_size = 1
        self.calls = []
        self.printed = []

    def setup(self, module, *optimizers):
        self.calls.append("setup")
        return (module, *optimizers) if optimizers else module

    def backward(self, loss, **kwargs):
        self.calls.append("backward")
        loss.backward(**kwargs)

    def all_reduce(self, tensor, group=None, reduce_op="mean"):
        self.calls.append("all_reduce")
        return tensor

    def broadcast(self, obj, src=0):
        return obj

    def barrier(self, name=None):
        self.calls.append("barrier")

    def print(self, *args, **kwargs):
        self.printed.append(" ".join(map(str, args)))
