"""When the distillation teacher runs in an RL step, and what it leaves for each mini-batch's update.

    phase = TeacherPhase(setup, prompts, batch, timer, meter)    # after the old / reference passes
    for mbs in batch.minibatches():
        targets = phase.targets(mbs)                              # exact GKD: the teacher's logits, now
        policy_update(..., teacher=targets)
    phase.close()

Once per step (timed as "teacher", memory measured as "teacher"): the teacher's vision features of the
step's prompts (its own tower, once per prompt, reused by every response and pass), then one teacher pass
over every micro-batch when something is kept for the whole rollout batch: p_phi rows (gamma_attn > 0;
stored like p_old, ``algorithm.old_policy_store``) and, with ``gkd_top_k`` > 0, the teacher's top-k + tail
per token. With exact GKD (gkd_mu > 0, gkd_top_k = 0) the teacher's full-vocabulary logits are computed per
mini-batch right before its update (the teacher is frozen, so they equal what a pass after the rollout
would give) and dropped after it: never the vocabulary for the whole batch at once. Those per-mini-batch
passes also capture the rows, so no separate pass runs. gkd_mu = 0 keeps no logits, gamma_attn = 0 no rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from megatron_ral.attention.old_policy import OldPolicyConfig, make_old_policy_store
from megatron_ral.distill.gkd import GKDConfig
from megatron_ral.distill.losses import gkd_teacher_targets
from megatron_ral.rl.passes import teacher_pass
from megatron_ral.rl.schedule import PassContext
from megatron_ral.rl.update import TeacherTargets
from megatron_ral.rl.vision import encode_prompts_vision


@dataclass
class TeacherSetup:
    """Built once by the trainer: the teacher (``distill.teacher.Teacher``) and what the loss needs of it."""

    teacher: object
    rows: OldPolicyConfig | None        # how p_phi is kept; None when gamma_attn = 0
    gkd: GKDConfig | None               # None when gkd_mu = 0
    temperature: float = 1.0
    tp_group: object = None

    @property
    def exact_gkd(self) -> bool:
        return self.gkd is not None and self.gkd.top_k == 0


class TeacherPhase:
    """The teacher's work of one step (see the module docstring)."""

    def __init__(self, setup: TeacherSetup, prompts: list, batch, timer, meter) -> None:
        self.setup, self.batch, self.timer, self.meter = setup, batch, timer, meter
        self.store = make_old_policy_store(setup.rows, setup.tp_group) if setup.rows is not None else None
        self.kept: dict = {}  # top-k + tail of every micro-batch (gkd_top_k > 0)
        teacher = setup.teacher
        with self._measured(), teacher.active():
            vision = encode_prompts_vision(teacher.model, prompts)
            self.ctx = PassContext(model=teacher.chunks, vision=vision, capture=teacher.capture,
                                   temperature=setup.temperature)
            topk = setup.gkd is not None and not setup.exact_gkd
            if topk or (self.store is not None and not setup.exact_gkd):
                teacher_pass(self.ctx, batch.micro_batches, self.store, self.kept if topk else None,
                             self._gkd_targets if topk else None)

    def _measured(self) -> contextlib.ExitStack:
        """Time and memory of a teacher phase."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.timer("teacher"))
        stack.enter_context(self.meter("teacher"))
        return stack

    def _gkd_targets(self, logits):
        return gkd_teacher_targets(logits, self.setup.gkd, self.setup.tp_group)

    def targets(self, micro_batches: list) -> TeacherTargets:
        """The teacher's targets for the update of ``micro_batches`` (one mini-batch)."""
        s = self.setup
        if not s.exact_gkd:
            return TeacherTargets(rows=self.store, gkd=self.kept, tp_group=s.tp_group)
        logits: dict = {}
        with self._measured(), s.teacher.active():
            teacher_pass(self.ctx, micro_batches, self.store, logits, self._gkd_targets)
        return TeacherTargets(rows=self.store, gkd=logits, tp_group=s.tp_group)

    def close(self) -> None:
        if self.store is not None:
            self.store.clear()
        self.kept.clear()
        self.ctx = None
