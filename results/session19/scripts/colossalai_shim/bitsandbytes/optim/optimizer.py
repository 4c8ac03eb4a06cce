import torch


class Optimizer2State(torch.optim.Optimizer):  # a base class to subclass; never instantiated by the peer
    pass
