"""The trainer: SFT, GRPO, RAL and RAL-zero on the Megatron-Core Qwen2.5-VL model.

    rewards      Video-R1 accuracy rewards per problem type, format reward, weighted total (pure)
    advantages   group-normalised sequence advantages (pure)
    losses       clipped surrogate, k3 KL, RAL attention term, SFT cross-entropy, global-normaliser aggregation (pure)
    batch        RolloutBatch (one step's rollouts) and the micro-batches every pass shares
    rollout      G sampled responses per prompt with the current weights, decoded and scored
    vision       vision features once per prompt per step
    schedule     one pass over micro-batches through megatron-core's pipeline schedule
    passes       old-policy pass (log-probs, p_old) and reference pass (log-probs)
    reference    the reference weights, swapped into the one model object
    update       one optimizer step of the GRPO / RAL loss on a mini-batch
    optim_step   the optimizer step with its non-finite guard
    sft          SFT as a loss of the same machinery
    step         one RL step: rollout -> score -> old/ref pass -> updates -> metrics
    evaluate     greedy held-out evaluation with the reward parser (trainer, tools/evaluate.py)
    metrics      metric sums reduced over ranks, phase timers
    build        model (DDP), optimizer, LR schedule and loaders from the config
    trainer      what train.py's loop calls: build, resume, step, evaluate, save, report

Submodules are imported explicitly.
"""
