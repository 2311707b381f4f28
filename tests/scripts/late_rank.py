"""train_accelerate.py with its second process late wherever the processes write a folder together.

On GPUs the processes drift apart by seconds (an uneven data loader, a slower device, a page fault); on a
tiny CPU run they arrive together and hide any step that relies on it. This shim delays rank 1 by 2 s
inside a checkpoint's save (before it writes its own files) and inside the export (after its part of the
weights is gathered), then runs the unchanged training script.
"""

import functools
import os
import sys
import time
from pathlib import Path

from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
DELAY_S = 2


def late_on_rank_1(method, after: bool):
    @functools.wraps(method)
    def late(*args, **kwargs):
        if not after and os.environ["RANK"] == "1":
            time.sleep(DELAY_S)
        result = method(*args, **kwargs)
        if after and os.environ["RANK"] == "1":
            time.sleep(DELAY_S)
        return result

    return late


Accelerator.save_state = late_on_rank_1(Accelerator.save_state, after=False)
Accelerator.get_state_dict = late_on_rank_1(Accelerator.get_state_dict, after=True)

if __name__ == "__main__":
    import train_accelerate

    try:
        train_accelerate.main()
    except ValueError as error:  # as the script's own entry point
        sys.exit(f"train_accelerate.py: error: {error}")
