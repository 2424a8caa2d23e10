"""Streaming, DP-sharded, prefetching loader of Video-R1 samples.

Each rank builds a byte-offset index of the record files once, then per epoch walks its shard of a
seeded global permutation (order[rank::world_size]). Records are parsed, decoded and preprocessed in
DataLoader worker processes (data.num_workers; 0 = in this process); each position of the shard
yields exactly one item (a Sample or a Failure), so the batch assembly here is deterministic, counts
every failure and can resume from (epoch, position).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_ral.data.collate import Batch, collate
from megatron_ral.config.data import DataConfig
from megatron_ral.data.errors import DataError
from megatron_ral.data.failures import FailureTracker, raise_no_usable_record
from megatron_ral.data.processor import QwenVLProcessor
from megatron_ral.data.records import RecordIndex
from megatron_ral.data.samples import Failure, Sample, SampleBuilder
from megatron_ral.data.sharding import epoch_order, shard
from megatron_ral.data.video.backend import BackendChoice, log_choice_once
from megatron_ral.platform.worker_signals import ignore_foreign_sigterm, start_workers


class ShardStream(IterableDataset):
    """Yields (epoch, position, Sample | Failure) for the positions >= start_position of this rank's
    shard of one epoch.

    Worker w of W handles the positions p with (p - start_position) % W == w, so the DataLoader's
    round-robin over its workers returns the items in position order.
    """

    def __init__(self, index: RecordIndex, builder: SampleBuilder, rank: int, world_size: int, seed: int, shuffle: bool,
                 epoch: int = 0, start_position: int = 0):
        self.index = index
        self.builder = builder
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = epoch
        self.start_position = start_position

    def shard_indices(self):
        return shard(epoch_order(len(self.index), self.epoch, self.seed, self.shuffle), self.rank, self.world_size)

    def item(self, i: int):
        source = self.index.source(int(i))
        try:
            record = self.index.read(int(i), require_process=self.builder.require_process)
            return self.builder.build(record)
        except DataError as e:
            return Failure.from_error(e, source)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shard_indices()
        for p in range(self.start_position + wid, len(mine), nw):
            yield self.epoch, p, self.item(mine[p])


class VisionDataLoader:
    """Batches of `batch_size` good samples for one data-parallel rank; failures are skipped and counted.

    rank / world_size are the data-parallel rank and size (tensor/pipeline peers pass the same values
    and get the same batches). num_epochs: stop after that many epochs (None: cycle, reshuffling
    every epoch); a batch may span the boundary between two epochs.

        loader = VisionDataLoader(cfg, processor, cfg.train_files, rank, world_size, batch_size=8)
        for batch in loader: ...            # Batch objects
        loader.metrics()                    # data/skipped/<reason>, data/skipped_total, data/samples_total
        stop_on_failures=False              # count only; the caller applies the stop rule (e.g. over DP ranks)
        loader.state_dict() / VisionDataLoader(..., state=saved)   # resume at the same record
    """

    def __init__(self, cfg: DataConfig, processor: QwenVLProcessor, files: list[str], rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, mode: str = "prompt", num_epochs: int | None = None, padding_side: str = "right",
                 state: dict | None = None, index: RecordIndex | None = None, stop_on_failures: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.processor = processor
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.index = index if index is not None else RecordIndex.build(list(files), cfg.max_records)
        self.builder = SampleBuilder(processor, cfg, mode)
        self.rank, self.world_size = rank, world_size
        self.num_epochs = num_epochs
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(self) == 0:
            raise ValueError(f"data-parallel rank {rank} of {world_size} gets no records ({len(self.index)} records in {list(files)})")
        self.tracker = FailureTracker(cfg.max_failure_fraction, cfg.failure_window, stop=stop_on_failures)
        self.epoch, self.position = 0, 0
        if state:
            self.load_state_dict(state)

    def __len__(self) -> int:
        """Records in this rank's shard per epoch."""
        return len(range(self.rank, len(self.index), self.world_size))

    def worker_count(self, start: int = 0) -> int:
        """DataLoader workers for an epoch read from position ``start``: data.num_workers, at most one per
        remaining record, and at most data.dali_gpu_workers when DALI decodes on the GPU (each worker
        holds its own CUDA context, NVDEC decoder and DALI memory pools)."""
        workers = min(self.cfg.num_workers, max(len(self) - start, 0))
        if self.builder.decoders.uses_gpu:
            workers = min(workers, self.cfg.dali_gpu_workers)
        return workers

    def _epoch_items(self, epoch: int, start: int) -> Iterator:
        stream = ShardStream(self.index, self.builder, self.rank, self.world_size, self.cfg.seed, self.cfg.shuffle, epoch, start)
        workers = self.worker_count(start)
        if workers == 0:
            yield from stream
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # data.prefetch_factor counts batches: each worker keeps its share of that many batches in flight.
        per_worker = self.cfg.prefetch_factor * -(-self.batch_size // workers)
        loader = DataLoader(
            stream, batch_size=None, num_workers=workers, prefetch_factor=per_worker,
            # CUDA (DALI on GPU) cannot be used in forked processes.
            multiprocessing_context="spawn" if self.builder.decoders.uses_gpu else None,
            # SLURM's SIGTERM reaches the workers too: they leave stopping to the trainer (see worker_signals).
            worker_init_fn=ignore_foreign_sigterm,
        )
        yield from start_workers(loader)  # SIGTERM blocked while the workers start

    def _items(self) -> Iterator:
        epoch, start = self.epoch, self.position
        while self.num_epochs is None or epoch < self.num_epochs:
            yield from self._epoch_items(epoch, start)
            epoch, start = epoch + 1, 0

    @staticmethod
    def _note(sample: Sample) -> None:
        """Log (once per codec, in this process) which backend decoded it, whichever worker did."""
        for v in sample.vision:
            if v.meta.get("codec"):
                choice = BackendChoice(v.meta["backend"], v.meta["device"], v.meta.get("backend_reason", ""))
                log_choice_once(v.meta["codec"], choice)

    def __iter__(self) -> Iterator[Batch]:
        pending: list[Sample] = []
        shard_len = len(self)
        failed_in_a_row = 0
        for epoch, position, item in self._items():
            self.epoch, self.position = epoch, position + 1
            if self.position >= shard_len:
                self.epoch, self.position = epoch + 1, 0
            if isinstance(item, Failure):
                self.tracker.fail(item)
                failed_in_a_row += 1
                if self.num_epochs is None and failed_in_a_row >= shard_len:
                    # An endless loader over a shard with no usable record would never yield: stop instead.
                    raise_no_usable_record(self.tracker.recent()[0] or [item], shard_len)
                continue
            failed_in_a_row = 0
            self.tracker.ok()
            self._note(item)
            pending.append(item)
            if len(pending) == self.batch_size:
                self.tracker.end_batch()
                yield collate(pending, self.processor.pad_token_id, self.padding_side)
                pending = []
        if pending:
            self.tracker.end_batch()
            yield collate(pending, self.processor.pad_token_id, self.padding_side)

    def metrics(self) -> dict[str, float]:
        return self.tracker.metrics()

    def state_dict(self) -> dict:
        """Position of the next record to read (samples already batched are not read again)."""
        return {"epoch": self.epoch, "position": self.position, "failures": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.position = int(state.get("position", 0))
        if "failures" in state:
            self.tracker.load_state_dict(state["failures"])
