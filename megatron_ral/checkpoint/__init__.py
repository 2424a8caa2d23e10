"""Checkpoints: HF <-> Megatron conversion, streaming IO, training checkpoints and run directories.

    convert            hf_to_megatron / megatron_to_hf (streaming, bounded memory, all-or-nothing output)
    safetensors_io     streaming reader/writer of (sharded) HF safetensors checkpoints
    dist_ckpt_io       megatron-core torch_dist checkpoints written and read chunk by chunk
    model_io           a model's weights saved / loaded as a layout-free torch_dist checkpoint
    initial_weights    a model's starting checkpoint: a Megatron one, or an HF directory converted once per run
    training           the training checkpoint: model, optimizer, LR scheduler, train and per-rank state;
                       written all-or-nothing, resumable at another TP/PP/DP layout
    run_dir            a run's iter_N checkpoints, temporary saves, the latest pointer, pruning (files only)
    rng_state          one process's RNG states (python, numpy, torch, CUDA, megatron tracker) captured/restored
    output_dir         atomic output directories, HF side files (config/tokenizer/processor), progress
    locate             what a path is (HF directory, dist checkpoint, training run) before torch is imported

The HF <-> Megatron name mapping and the config facts belong to the model (models/qwen25vl/mapping.py,
arch.py); the tiny-model maker is megatron_ral.tiny.
"""
