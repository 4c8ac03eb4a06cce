"""vitboost: fine-tune and benchmark Vision Transformers on one GPU or many."""
__version__ = "0.1.0"

import time as _time

IMPORTED = _time.perf_counter()  # where /proc cannot tell when the process started: the launch phase's start
