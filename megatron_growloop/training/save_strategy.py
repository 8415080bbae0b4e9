"""A torch_dist save strategy that writes in the calling process.

megatron-core's default torch_dist writer forks helper processes for every save (and
spawns a multiprocessing manager on the first one): the right thing for large
asynchronous training checkpoints, pure overhead for a one-process conversion or a
growth step's scratch checkpoint.  :class:`SyncSaveStrategy` writes the same on-disk
format synchronously; ``sync_files`` chooses whether files are fsynced (durable output)
or not (a scratch checkpoint that is read back at once and deleted).

Training saves use it too (``thread_count`` writer threads per rank): helper processes
forked or spawned by a training rank outlive it when the rank is killed (megatron-core's
writer keeps a spawned ``multiprocessing`` manager, whose ``spawn_main`` and
``resource_tracker`` processes were seen alive 18 minutes after a worker was SIGKILLed);
threads die with their process.
"""

from __future__ import annotations

import threading

from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save


class CheckedFileSystemWriter(FileSystemWriter):
    """torch's ``FileSystemWriter`` whose helper-thread failures fail the save.

    With ``thread_count > 1`` torch writes some files from helper threads; an exception there
    (e.g. ENOSPC) is printed by ``threading.excepthook`` as a traceback and otherwise dropped --
    the save can even "succeed" without those files.  Raising it from ``write_data`` instead
    lets torch DCP agree on the failure across ranks (every rank raises ``CheckpointException``)."""

    def write_data(self, plan, planner):
        errors = []
        previous = threading.excepthook

        def hook(args):
            if args.thread is not threading.main_thread():
                errors.append(args.exc_value)
            else:
                previous(args)

        before = set(threading.enumerate())
        threading.excepthook = hook
        try:
            fut = super().write_data(plan, planner)
        finally:
            # torch skips joining its helper threads when the calling thread fails
            for t in set(threading.enumerate()) - before:
                t.join()
            threading.excepthook = previous
        if errors:
            raise errors[0]
        return fut


class SyncSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist saving written synchronously by the calling process (same format)."""

    def __init__(self, sync_files: bool = True, thread_count: int = 1):
        super().__init__("torch_dist", 1)
        self.sync_files = sync_files
        self.thread_count = max(1, int(thread_count))

    def save(self, sharded_state_dict, checkpoint_dir):
        sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sd, False)
        writer = CheckedFileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, sync_files=self.sync_files,
                                         thread_count=self.thread_count)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
        dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
