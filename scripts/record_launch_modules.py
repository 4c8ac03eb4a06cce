"""Record the modules a vitboost command imports, in import order, into vitboost/launch_modules.txt.

That list is what bytecode.py compiles ahead of the imports on a machine whose Python may not write bytecode.
Names already in the file keep their place; new ones are added after them, so record the run that matters
most first (the recipe on a GPU), then others:

    python scripts/record_launch_modules.py train --config configs/beans_scratch.yaml --epochs 2 ...
"""
from __future__ import annotations

import atexit
import sys
from pathlib import Path

MANIFEST = Path(__file__).resolve().parents[1] / "vitboost" / "launch_modules.txt"


def record() -> None:
    names = []
    for name, module in list(sys.modules.items()):
        if name != "__main__" and (getattr(module, "__file__", None) or "").endswith(".py"):
            parts = name.split(".")  # parents first (a frozen package has no __file__): a worker finds a
            names += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # module through its parent
    known = MANIFEST.read_text().split() if MANIFEST.exists() else []
    merged = list(dict.fromkeys(known + names))
    MANIFEST.write_text("\n".join(merged) + "\n")
    print(f"{MANIFEST}: {len(merged)} modules ({len(merged) - len(known)} new)", file=sys.stderr)


if __name__ == "__main__":
    atexit.register(record)
    sys.argv = ["vitboost"] + sys.argv[1:]
    from vitboost.cli import main
    sys.exit(main())
