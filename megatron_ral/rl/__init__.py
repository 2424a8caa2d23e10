"""The trainer: SFT, GRPO, RAL, RAL-zero and RAL + on-policy distillation on the Megatron-Core Qwen2.5-VL model.

The algorithm (pure functions of tensors and rewards):

    rewards      Video-R1 accuracy rewards per problem type, format reward, weighted total
    advantages   group-normalised sequence advantages
    losses       clipped surrogate, k3 KL, RAL attention term, SFT cross-entropy, global-normaliser aggregation
    update       the mini-batch loss composed from those terms (and distill's GKD / attention distillation), and
                 one optimizer step of it
    optim_step   the optimizer step with its non-finite guard
    sft          SFT as a loss of the same machinery

The loop's phases (what one training step does, in order):

    build        model (DDP), optimizer, LR schedule and loaders from the config
    rollout      G sampled responses per prompt with the current weights, decoded and scored
    batch        RolloutBatch (one step's rollouts) and the micro-batches every pass shares
    packing      the same micro-batches as packed streams (training.packing: sequences, shared-prompt groups)
    vision       vision features once per prompt per step
    schedule     one pass over micro-batches through megatron-core's pipeline schedule
    passes       old-policy pass (log-probs, p_old), reference pass (log-probs), teacher pass (p_phi, GKD targets)
    teacher_phase  when the distillation teacher runs in a step and what each mini-batch's update gets of it
    reference    the reference weights, swapped into the one model object
    step         one RL step: rollout -> score -> old/ref[/teacher] pass -> updates -> metrics
    evaluate     greedy held-out evaluation with the reward parser (trainer, tools/evaluate.py)
    metrics      metric sums reduced over ranks, phase timers and memory meters
    trainer      what train.py's loop calls: build, resume, step, evaluate, save, report

The quickstart's summary and tools/evaluate.py's command line are in ``megatron_ral.cli``; the TRL comparison
is ``megatron_ral.bench``.

Submodules are imported explicitly.
"""
