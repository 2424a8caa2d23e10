"""Checkpoints: HF <-> Megatron conversion, streaming IO, and locally generated test checkpoints.

    convert            hf_to_megatron / megatron_to_hf (streaming, bounded memory, all-or-nothing output)
    mapping            parameter names and QKV / fc1 layouts, HF <-> Megatron-Core
    safetensors_io     streaming reader/writer of (sharded) HF safetensors checkpoints
    dist_ckpt_io       megatron-core torch_dist checkpoints written and read chunk by chunk
    model_io           a model's weights saved / loaded as a layout-free torch_dist checkpoint
    initial_weights    a model's starting checkpoint: a Megatron one, or an HF directory converted once per run
    training           the training checkpoint: model, optimizer, LR scheduler, train and per-rank state;
                       written all-or-nothing, resumable at another TP/PP/DP layout
    run_dir            a run's iter_N checkpoints, temporary saves, the latest pointer, pruning (files only)
    rng_state          one process's RNG states (python, numpy, torch, CUDA, megatron tracker) captured/restored
    output_dir         atomic output directories, HF side files (config/tokenizer/processor), progress
    qwen25vl_arch      the shape facts of a Qwen2.5-VL config
    tiny               seeded tiny/small Qwen2.5-VL HF checkpoints (tokenizer, processor) for tests
    random_checkpoint  random checkpoints with the released shapes, for benchmarks
"""
