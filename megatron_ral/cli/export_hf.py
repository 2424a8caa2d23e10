"""``megatron-ral-export-hf`` (tools/export_hf.py): a training run's checkpoint as a Hugging Face directory.

    tools/export_hf.py --run RUN_DIR [--step N] --out DIR [--verify] [--overwrite] [--json]

The newest complete checkpoint of the run (or step N's) is converted (``checkpoint.convert.megatron_to_hf``;
the processor configs carry the run's vision budgets), then ``transformers`` loads the export with its
``AutoProcessor`` and greedily generates a few tokens. ``--verify``: the exported model's logits equal the
Megatron model's in fp32 on one image prompt and one video prompt (every prompt position, the whole
vocabulary), built with the run's data settings; the largest difference is reported and the tool exits 1
when it exceeds ``--tolerance`` (1e-4). The Megatron side resumes M-RoPE text positions after a video as
the installed transformers does (``model.rope_text_after_vision``; transformers >= 5.3 differs from the
released Qwen code for videos longer in time than in space), and the summary names both rules. Single
process.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json, add_overwrite
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.errors import UsageError

DEFAULT_TOLERANCE = 1e-4
VERIFY_PROMPT = "Describe what you see."


def parser() -> ToolParser:
    p = ToolParser(prog=prog_name("export_hf.py"), description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="training run directory (RUN_DIR with checkpoints/iter_*)")
    p.add_argument("--step", type=int, default=None, help="export step N's checkpoint (default: the newest)")
    p.add_argument("--out", required=True, help="output Hugging Face directory (created; absent or empty)")
    add_overwrite(p)
    p.add_argument("--verify", action="store_true",
                   help="compare the export's fp32 logits with the Megatron model's on an image and a video prompt")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="--verify: largest allowed |difference|")
    p.add_argument("--prompt", default="Say something.", help="text prompt of the generation check")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens the generation check generates")
    add_json(p, "the summary (checkpoint, out, generated text, verification figures)")
    return p


def run_checkpoint(run: str, step: int | None) -> Path:
    """The checkpoint directory of ``run`` to export (one line naming the flag when there is none)."""
    from megatron_ral.checkpoint.locate import megatron_checkpoint
    from megatron_ral.checkpoint.run_config import DEFAULT_SAVE_DIR, find_run_config
    from megatron_ral.checkpoint.run_dir import complete_checkpoints, iteration_dir_name

    root = Path(run)
    if not root.is_dir():
        raise UsageError(f"--run {run}: no such directory")
    save_dir = root / DEFAULT_SAVE_DIR
    kept = find_run_config(root)
    if kept is not None:
        import yaml

        configured = ((yaml.safe_load(kept.read_text()) or {}).get("checkpoint") or {}).get("save_dir")
        if configured:
            save_dir = Path(configured)
    if not save_dir.is_dir():
        save_dir = root  # a save directory given directly
    if step is None:
        return megatron_checkpoint(save_dir, "--run")
    done = dict(complete_checkpoints(save_dir))
    if step not in done:
        have = ", ".join(str(s) for s in sorted(done)) or "none"
        raise UsageError(f"--step {step}: {save_dir} has no complete {iteration_dir_name(step)} (steps: {have})")
    return megatron_checkpoint(done[step], "--step")


def _verify_media(root: Path) -> dict:
    """A small random image and an 8-frame VP9 video (the checks' inputs)."""
    import numpy as np
    from PIL import Image

    from megatron_ral.data.synthetic import write_video

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(8, 56, 84, 3), dtype=np.uint8)
    write_video(str(root / "verify.webm"), frames, fps=4, codec="vp9")
    Image.fromarray(frames[0]).save(root / "verify.png")
    return {"image": str(root / "verify.png"), "video": str(root / "verify.webm")}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check.at_least(args.max_new_tokens, 1, "--max-new-tokens")
    if not args.tolerance > 0:
        raise UsageError(f"--tolerance {args.tolerance}: must be > 0")
    dist_dir = run_checkpoint(args.run, args.step)
    check.output_dir(args.out, "--out", args.overwrite)
    check.not_inside(args.out, Path(args.run), "--run")

    from megatron_ral.checkpoint.convert import megatron_to_hf
    from megatron_ral.cli.run_settings import load_settings, media_budget, settings_report

    settings = load_settings(dist_dir, None, dist_dir=dist_dir)
    result = megatron_to_hf(dist_dir, args.out, overwrite=args.overwrite, progress=False)

    import torch
    from transformers import AutoProcessor

    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.inference.export_check import hf_greedy, load_hf, logits_difference
    from megatron_ral.inference.loading import stop_token_ids
    from megatron_ral.inference.prompts import build_prompt

    AutoProcessor.from_pretrained(args.out)
    hf_model = load_hf(args.out)
    processor = QwenVLProcessor.from_pretrained(str(args.out))
    stops = stop_token_ids(args.out, processor.tokenizer)
    prompt, _ = build_prompt(args.out, args.prompt, processor=processor)
    ids = hf_greedy(hf_model, prompt, args.max_new_tokens, stops)
    summary = {"checkpoint": str(dist_dir), "out": str(result.out_dir), "tensors": result.num_tensors,
               "generated": processor.decode(ids, skip_special_tokens=True), "generated_ids": ids,
               "settings": settings_report(settings)}

    failed = False
    if args.verify:
        from megatron_ral.cli.model_flags import run_on_platform
        from megatron_ral.config.schema import ParallelConfig
        from megatron_ral.inference.export_check import transformers_rope_rule
        from megatron_ral.inference.loading import load_model

        data = settings.cfg.data
        with tempfile.TemporaryDirectory() as tmp:
            media = _verify_media(Path(tmp))
            prompts = {kind: build_prompt(args.out, VERIFY_PROMPT, processor=processor, budget=media_budget(data, kind),
                                          **{kind: path})[0] for kind, path in media.items()}

        rope = transformers_rope_rule()

        def work(info):
            model = load_model(dist_dir, ParallelConfig(), dtype=torch.float32, rope_text_after_vision=rope)
            return {kind: logits_difference(model, hf_model, p) for kind, p in prompts.items()}

        figures = run_on_platform(ParallelConfig(), 0, work)
        failed = any(f["max_abs"] > args.tolerance for f in figures.values())
        summary["verify"] = {"tolerance": args.tolerance, "passed": not failed, "rope_text_after_vision": rope,
                             "trained_rope_text_after_vision": settings.cfg.model.rope_text_after_vision, **figures}

    if args.json:
        print(json.dumps(summary))
    else:
        print(f"exported {dist_dir} -> {result.out_dir}; transformers generates: {summary['generated']!r}")
        for kind, f in summary.get("verify", {}).items():
            if isinstance(f, dict):
                print(f"verify {kind}: max |logit difference| {f['max_abs']:.2e} over {f['positions']} positions "
                      f"(largest |logit| {f['max_logit']:.2f}, tolerance {args.tolerance:.0e})")
    sys.stdout.flush()
    if failed:
        print(f"{prog_name('export_hf.py')}: error: the export's logits differ from the checkpoint's by more than "
              f"{args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


def cli() -> NoReturn:
    run_main(prog_name("export_hf.py"), main)
