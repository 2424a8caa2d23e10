"""Command line of held-out evaluation (tools/evaluate.py, ``megatron-ral-evaluate``).

    [torchrun --nproc-per-node N] tools/evaluate.py --ckpt CKPT --data RECORDS.json [--media-root DIR]
        [--config RUN.yaml] [--template think|answer_only] [--max-new-tokens K] [--max-records N]
        [--tp T --pp P --pp-split A,B] [--dtype auto|fp32|bf16] [--json] [--out RESULTS.json]
        [section.key=value ...]

Greedy answers to every record, scored with the reward parser of the training run (the same
``megatron_ral.rl.evaluate.evaluate`` the trainer's ``eval/*`` metrics come from). The data and generation
settings (fps, frames, pixels, template, response cap, media root) are the ones the checkpoint was trained
with, read from the configuration it keeps (``run_config.yaml`` / its run's ``config.yaml``); ``--config``
replaces that, overrides and flags win over both; the output states the settings and their sources. The
process count may be any multiple of TP x PP: the records are sharded over the data-parallel ranks.
``--out`` writes accuracy, by_problem_type, n, skipped (with reasons), the settings and one prediction per
record.
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_ckpt, add_dtype, add_json, add_layout
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.errors import UsageError


def parser() -> ToolParser:
    p = ToolParser(prog=prog_name("evaluate.py"), description=__doc__.split("\n\n")[0])
    add_ckpt(p)
    p.add_argument("--data", required=True, help="Video-R1 record file (JSON array or JSON lines) to evaluate on")
    p.add_argument("--media-root", default=None, help="directory the records' paths are relative to "
                                                      "(default: the config's data.media_root, else the records' directory)")
    p.add_argument("--config", default=None, help="training config whose data / generation settings to use "
                                                  "(default: the one the checkpoint keeps)")
    p.add_argument("--template", choices=("think", "answer_only"), default=None,
                   help="prompt template and format reward (default: data.template of --config, else think)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response cap (default: the config's)")
    p.add_argument("--max-records", type=int, default=None, help="evaluate the first N records only")
    p.add_argument("--show", type=int, default=0, help="also report the first N responses (rank 0's records)")
    p.add_argument("--seed", type=int, default=0, help="platform seed (greedy decoding does not sample)")
    add_layout(p)
    add_dtype(p)
    add_json(p, "accuracy, format, reward, count, skipped, accuracy by type and the settings used")
    p.add_argument("--out", default=None, help="RESULTS.json to write: accuracy, by_problem_type, n, skipped "
                                               "(with reasons), settings, per-record predictions")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (e.g. data.fps=2)")
    return p


def _settings(args, dist_dir):
    """The run settings (kept config / --config / defaults, overrides, flags), validated."""
    from pathlib import Path

    from megatron_ral.cli.run_settings import load_settings
    from megatron_ral.config import validate

    settings = load_settings(args.ckpt, args.config, args.overrides, dist_dir=dist_dir)
    cfg = settings.cfg
    cfg.model.load, cfg.model.hf_path = args.ckpt, ""
    cfg.data.eval_files = [args.data]
    cfg.data.train_files = [args.data]
    if args.media_root is not None:
        settings.set("data.media_root", args.media_root)
    elif not cfg.data.media_root or not Path(cfg.data.media_root).is_dir():
        settings.set("data.media_root", str(Path(args.data).parent), "the records' directory")
    if args.template is not None:
        settings.set("data.template", args.template)
    if args.max_new_tokens is not None:
        settings.set("generation.max_new_tokens", args.max_new_tokens)
    cfg.training.max_eval_records = args.max_records
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = args.tp, args.pp
    cfg.parallel.context_parallel_size = 1
    cfg.parallel.pipeline_layer_split = None
    settings.cfg = validate(cfg)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from megatron_ral.checkpoint.locate import find_hf_config_dir, megatron_checkpoint, processor_dir
    from megatron_ral.models.qwen25vl.arch import arch_from_config, load_hf_config
    from megatron_ral.platform.launch_env import rank_and_world

    world = rank_and_world()[1]
    if args.tp < 1 or args.pp < 1 or world % (args.tp * args.pp):
        raise UsageError(f"{world} process(es) is not a multiple of --tp {args.tp} x --pp {args.pp}")
    if args.max_records is not None:
        check.at_least(args.max_records, 1, "--max-records")
    if args.max_new_tokens is not None:
        check.at_least(args.max_new_tokens, 1, "--max-new-tokens")
    check.at_least(args.show, 0, "--show")
    dist_dir = megatron_checkpoint(args.ckpt, "--ckpt")
    model_dir = processor_dir(find_hf_config_dir(dist_dir, args.ckpt), "--ckpt")
    arch = arch_from_config(load_hf_config(model_dir), str(model_dir / "config.json"))
    split = check.layout(args.tp, args.pp, args.pp_split, num_layers=arch.num_layers,
                         num_heads=arch.num_attention_heads, num_kv_heads=arch.num_query_groups)
    check.input_file(args.data, "--data")
    if args.out is not None:
        check.output_file(args.out, "--out")
    settings = _settings(args, dist_dir)
    cfg = settings.cfg
    cfg.parallel.pipeline_layer_split = split
    if cfg.data.media_root:
        check.input_dir(cfg.data.media_root, "--media-root")

    from megatron_ral.cli.model_flags import run_on_platform, torch_dtype
    from megatron_ral.cli.run_settings import settings_report

    report = settings_report(settings)

    def work(info):
        result, skipped = evaluate_checkpoint(cfg, str(model_dir), torch_dtype(args.dtype), keep_samples=args.show,
                                              keep_predictions=args.out is not None, show_progress=True)
        if info.rank == 0:
            out = {"ckpt": args.ckpt, "data": args.data, "accuracy": result.accuracy, "format": result.format,
                   "reward": result.reward, "count": result.count, "skipped": result.skipped,
                   "accuracy_by_type": result.by_type, "settings": report,
                   "samples": [{"problem_id": pid, "response": text, "accuracy": acc}
                               for pid, text, acc in result.samples]}
            if args.out is not None:
                results = {"ckpt": args.ckpt, "data": args.data, "accuracy": result.accuracy,
                           "by_problem_type": result.by_type, "n": result.count, "format": result.format,
                           "reward": result.reward, "skipped": skipped, "settings": report,
                           "predictions": result.predictions}
                check.write_file_atomically(args.out, "--out",
                                            lambda tmp: tmp.write_text(json.dumps(results, indent=1) + "\n"))
            print(json.dumps(out) if args.json else
                  f"accuracy {result.accuracy:.4f}  format {result.format:.4f}  over {result.count} records"
                  + (f" ({result.skipped} unreadable, skipped)" if result.skipped else "")
                  + f"\nsettings from {settings.base}")
            sys.stdout.flush()

    run_on_platform(cfg.parallel, args.seed, work)
    return 0


def evaluate_checkpoint(cfg, model_dir: str, dtype=None, keep_samples: int = 0, keep_predictions: bool = False,
                        show_progress: bool = False):
    """Load ``cfg.model.load`` at this rank's layout and evaluate it on ``cfg.data.eval_files`` (greedy).

    Returns (EvalResult, skipped): with ``keep_predictions`` the result's predictions are every record's
    (gathered to every rank from the data-parallel ranks); ``skipped`` is {"count", "by_reason", "records":
    [{reason, source, detail}]} over the data-parallel ranks."""
    import dataclasses

    import torch
    from megatron.core import parallel_state as ps

    from megatron_ral.data.loader import VisionDataLoader
    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.inference.loading import load_model, stop_token_ids
    from megatron_ral.rl.evaluate import evaluate

    model = load_model(cfg.model.load, cfg.parallel, dtype=dtype, backend=cfg.model.layer_spec,
                       rope_text_after_vision=cfg.model.rope_text_after_vision,
                       attention_backend=cfg.model.attention_backend)
    processor = QwenVLProcessor.from_pretrained(model_dir)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    data_cfg = dataclasses.replace(cfg.data, shuffle=False, max_records=cfg.training.max_eval_records)
    loader = VisionDataLoader(data_cfg, processor, list(cfg.data.eval_files), rank=dp_rank, world_size=dp,
                              batch_size=max(1, cfg.training.prompts_per_step // dp), mode="prompt", num_epochs=1)
    owner = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True)
    gen = dataclasses.replace(cfg.generation, temperature=0.0)
    result = evaluate(model, loader, processor.tokenizer, gen, template=cfg.data.template,
                    stop_token_ids=stop_token_ids(model_dir, processor.tokenizer),
                    suppress_token_ids=[model.image_token_id, model.video_token_id],
                    image_token_id=model.image_token_id, video_token_id=model.video_token_id,
                    accuracy_weight=cfg.algorithm.reward_accuracy_weight,
                    format_weight=cfg.algorithm.reward_format_weight, owner=owner, keep_samples=keep_samples,
                    keep_predictions=keep_predictions, show_progress=show_progress)
    failures = [{"reason": f.reason, "source": str(f.source), "detail": str(f.detail)}
                for f in loader.tracker.recent()[0]]
    mine = (result.predictions if owner else [], failures if owner else [])
    gathered = [mine]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
    result.predictions = [p for preds, _ in gathered for p in preds]
    records = [f for _, fails in gathered for f in fails]
    by_reason: dict[str, int] = {}
    for f in records:
        by_reason[f["reason"]] = by_reason.get(f["reason"], 0) + 1
    return result, {"count": result.skipped, "by_reason": by_reason, "records": records}


def cli() -> NoReturn:
    run_main(prog_name("evaluate.py"), main)
