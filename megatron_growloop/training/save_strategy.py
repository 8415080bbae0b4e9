"""A torch_dist save strategy that writes in the calling process.

megatron-core's default torch_dist writer forks helper processes for every save (and
spawns a multiprocessing manager on the first one): the right thing for large
asynchronous training checkpoints, pure overhead for a one-process conversion or a
growth step's scratch checkpoint.  :class:`SyncSaveStrategy` writes the same on-disk
format synchronously; ``sync_files`` chooses whether files are fsynced (durable output)
or not (a scratch checkpoint that is read back at once and deleted).
"""

from __future__ import annotations

from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save


class SyncSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist saving written synchronously by the calling process (same format)."""

    def __init__(self, sync_files: bool = True):
        super().__init__("torch_dist", 1)
        self.sync_files = sync_files

    def save(self, sharded_state_dict, checkpoint_dir):
        sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sd, False)
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, sync_files=self.sync_files,
                                  thread_count=1)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
        dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
