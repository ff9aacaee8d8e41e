"""Several processes opening one storage at the same instant (a test helper)."""

import subprocess
import sys
import time

OPEN = """
import sys, time
from nas.storage import make_storage
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
make_storage(sys.argv[1])
"""


def open_at_once(url: str, processes: int = 6) -> list[str]:
    """Each process's failure output (empty: it opened the storage)."""
    start = time.time() + 8  # past every interpreter's imports
    opening = [subprocess.Popen([sys.executable, "-c", OPEN, url, str(start)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(processes)]
    outputs = [p.communicate(timeout=120)[0] for p in opening]
    return [output.strip() if p.returncode else "" for p, output in zip(opening, outputs)]
