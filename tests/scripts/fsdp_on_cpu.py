"""train_accelerate.py under FSDP2 on CPU processes (gloo), for the tests.

accelerate selects FSDP only on accelerator backends: launched on CPU with an FSDP config it quietly
wraps the model in DDP instead. This shim makes the choice accelerate would make on GPUs (FSDP, with the
plugin the launcher's config built), then runs the unchanged training script, so every FSDP code path of
accelerate and of ours runs: fully_shard per Block, sharded checkpoints, full state dicts for export.
"""

import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
initialise = AcceleratorState.__init__


def initialise_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    initialise(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.fsdp_plugin = fsdp_plugin
        # Every later AcceleratorState() copies PartialState's fields over its own: set the type in both.
        PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP


AcceleratorState.__init__ = initialise_with_fsdp

if __name__ == "__main__":
    import train_accelerate

    try:
        train_accelerate.main()
    except ValueError as error:  # as the script's own entry point
        sys.exit(f"train_accelerate.py: error: {error}")
