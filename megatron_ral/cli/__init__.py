"""Command lines: one module per command, the only place that knows about argv, printing and exit codes.

    entry          run_main: the one way every command ends on bad input (one line, exit 2)
    arguments      the tools' parser and shared flags
    input_checks   path, media, layout and value checks made before torch is imported
    model_flags    what the model tools share (checkpoint + layout flags, dtype, running on the platform)
    train          python -m megatron_ral.train (megatron-ral-train)
    config         python -m megatron_ral.config (megatron-ral-config)
    convert_hf_to_megatron, convert_megatron_to_hf, make_tiny_checkpoint, make_synthetic_videos,
    preprocess, generate, dump_attention, evaluate     tools/<name>.py (megatron-ral-<name>)
    summary        the quickstart's summary.json (python -m megatron_ral.cli.summary)

Product packages never import this package; ``tools/*.py`` and the console scripts call it.
"""
