"""Accounting of skipped samples: counts per reason, metrics, and the stop rule."""

from __future__ import annotations

import logging
from collections import Counter, deque

from megatron_ral.data.errors import SKIP_REASONS, TooManyFailuresError
from megatron_ral.data.samples import Failure

logger = logging.getLogger(__name__)


class FailureTracker:
    """Counts good and failed draws; raises TooManyFailuresError when too many recent draws fail.

    The failed share is measured over the last max(window, draws of the current batch) draws, with
    the window size as the denominator until that many draws have happened (a single bad file at the
    start of training does not stop it):

        fraction = failed_recent / max(window, draws_in_batch)   ->   stop if fraction > max_fraction
    """

    def __init__(self, max_fraction: float = 0.05, window: int = 100, stop: bool = True):
        self.max_fraction = max_fraction
        self.window = window
        self.stop = stop  # False: only count; the caller decides (e.g. over every data-parallel rank)
        self.counts: Counter = Counter()
        self.total = 0
        self.failed = 0
        self._recent: deque = deque()  # (failed: bool, source) of the last draws
        self._batch_draws = 0
        self._batch_failed = 0

    def _span(self) -> int:
        return max(self.window, self._batch_draws)

    def _push(self, item) -> None:
        self._recent.append(item)
        while len(self._recent) > self._span():
            self._recent.popleft()

    def ok(self) -> None:
        self.total += 1
        self._batch_draws += 1
        self._push((False, None))

    def fail(self, failure: Failure) -> None:
        self.total += 1
        self.failed += 1
        self.counts[failure.reason] += 1
        self._batch_draws += 1
        self._batch_failed += 1
        self._push((True, failure))
        logger.warning("skipping sample (%s): %s: %s [record %s]", failure.reason, failure.source, failure.detail, failure.record_source)
        self.check()

    def recent(self) -> tuple[list[Failure], int]:
        """(the failures among the recent draws, the span they are counted over)."""
        return [f for bad, f in self._recent if bad], self._span()

    def check(self) -> None:
        if self.stop:
            failed, span = self.recent()
            raise_if_too_many(failed, span, self.max_fraction)

    def end_batch(self) -> dict:
        """Close the current batch; return its failure counts."""
        out = {"draws": self._batch_draws, "failed": self._batch_failed}
        self.check()
        self._batch_draws = 0
        self._batch_failed = 0
        while len(self._recent) > self._span():
            self._recent.popleft()
        return out

    def metrics(self) -> dict[str, float]:
        """Cumulative counters: data/skipped/<reason>, data/skipped_total, data/samples_total."""
        out = {f"data/skipped/{r}": float(self.counts.get(r, 0)) for r in SKIP_REASONS}
        out["data/skipped_total"] = float(self.failed)
        out["data/samples_total"] = float(self.total)
        return out

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "total": self.total, "failed": self.failed}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state.get("counts", {}))
        self.total = int(state.get("total", 0))
        self.failed = int(state.get("failed", 0))


def raise_if_too_many(failed: list[Failure], span: int, max_fraction: float, shared: bool = False) -> None:
    """TooManyFailuresError when ``len(failed) / span`` exceeds ``max_fraction``; ``shared``: every rank raises
    it alike (the counts were summed over ranks), so one rank reports it."""
    if span > 0 and len(failed) / span > max_fraction:
        files = sorted({f.source for f in failed})
        reasons = Counter(f.reason for f in failed)
        shown = ", ".join(files[:20]) + (f", ... ({len(files) - 20} more)" if len(files) > 20 else "")
        err = TooManyFailuresError(
            f"{len(failed)} of the last {span} samples failed "
            f"({len(failed) / span:.1%} > data.max_failure_fraction={max_fraction:.1%}); "
            f"reasons {dict(reasons)}; files: {shown}"
        )
        if shared:
            err.same_on_every_rank = True
        raise err


def raise_no_usable_record(failed: list[Failure], shard_len: int) -> None:
    """TooManyFailuresError for a shard of ``shard_len`` records of which a whole pass yielded none."""
    files = sorted({f.source for f in failed})
    reasons = Counter(f.reason for f in failed)
    shown = ", ".join(files[:20]) + (f", ... ({len(files) - 20} more)" if len(files) > 20 else "")
    raise TooManyFailuresError(
        f"none of the {shard_len} records of this rank's shard could be used in a whole pass; "
        f"reasons {dict(reasons)}; files: {shown}"
    )
