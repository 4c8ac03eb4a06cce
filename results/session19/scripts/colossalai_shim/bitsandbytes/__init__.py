"""Import shim, peer benchmark only: ColossalAI 0.5.0 imports bitsandbytes' Optimizer2State at import time
(for its GaLore optimizers, which the peer never builds); the GPU image has no bitsandbytes."""
