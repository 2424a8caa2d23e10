"""Video/image input pipeline for Qwen2.5-VL training on Video-R1-style data.

    records     Video-R1 records, byte-offset index over JSON-array / JSON-lines files
    sharding    per-epoch order and its exact partition across data-parallel ranks
    prompts     thinking / answer-only (RAL-zero) prompt text, SFT targets
    processor   tokenizer + chat template + vision pad expansion of a checkpoint directory
    geometry    smart_resize, per-frame video pixel budget, grids and token counts
    pixels      resize, normalise, temporal pad, patchify -> VisionInput
    image       PIL loading;  video/  probing, Qwen frame sampling, DALI and PyAV decoders
    media       file -> VisionInput;  samples  record -> Sample;  collate  Samples -> Batch
    failures    skip accounting and the stop rule;  loader  the prefetching DP-sharded loader
    single      one media file + prompt -> model inputs (tools/preprocess.py)
    synthetic   the embedded synthetic dataset (tools/make_synthetic_videos.py)

DataConfig (the ``data:`` section) lives in megatron_ral.config.data. Submodules are imported explicitly (this package imports nothing heavy on its own).
"""
