"""Compiling the student's blocks beside the teacher's training, repeated: does it break? (one GPU)

    python benchmarks/compile_beside_capture.py new 40   # started once the teacher's step is captured (vitboost)
    python benchmarks/compile_beside_capture.py old 40   # started before the teacher: may overlap its capture

Each iteration trains a small teacher for 3 epochs (its step captured as a CUDA graph at the third call)
while vitboost.compile_ahead compiles/runs a one-block copy of a vit-tiny in a thread. A hang prints every
thread's stack after 40 s and exits. BENCHMARKS.md section 23: old broke at its 4th iteration, new ran 40 of 40.
"""
import faulthandler, sys, time, torch
from vitboost.model import build_model
from vitboost.regularize import apply_drop_path
from vitboost.parallel.tensor import find_blocks
from vitboost.compile_ahead import CompileAhead
from vitboost.config import TrainConfig
from vitboost.data import ImageSplit
from vitboost import distill

order, n = sys.argv[1], int(sys.argv[2])
faulthandler.dump_traceback_later(40, exit=True)  # a hang prints every thread's stack, then exits
dev = torch.device("cuda")
model, _ = build_model("vit-tiny", ["a", "b", "c"], pretrained="none", image_size=160, log=lambda *a: None)
apply_drop_path(model, 0.1)
for _, b in find_blocks(model):
    b.compile()
model.to(dev)
cfg = TrainConfig(batch_size=128, teacher_epochs=3, seed=42)
split = ImageSplit(torch.randint(0, 255, (1034, 3, 160, 160), dtype=torch.uint8, device=dev),
                   torch.randint(0, 3, (1034,), device=dev))
auto = lambda: torch.autocast("cuda", torch.bfloat16)
t0 = time.time()
for i in range(n):
    faulthandler.dump_traceback_later(40, exit=True)
    ahead = CompileAhead(model, torch.zeros(128, 3, 160, 160, device=dev), auto)
    if order == "old":
        ahead.start()
    teacher = distill._named("resnet-small", 3, dev, 42)
    distill._train(teacher, split, 3, [0.5] * 3, [0.5] * 3, cfg, dev, beside=None if order == "old" else ahead.start)
    ahead.join()
    print(f"{order} {i} ok {time.time() - t0:.1f}s thread {ahead.seconds:.2f}s", flush=True)
faulthandler.cancel_dump_traceback_later()
