"""``megatron-ral-visualize-attention`` (tools/visualize_attention.py): pictures of where a model attends.

    tools/visualize_attention.py --ckpt CKPT --sample RECORD --out DIR [--response TEXT] [--tokens I,J,...]
        [--config RUN.yaml] [--media-root DIR] [--dtype auto|fp32|bf16] [--json]
    tools/visualize_attention.py --run RUN_DIR --out DIR                  # the training curves only

RECORD is one Video-R1 record (a JSON object, or a file holding one, or a one-record array); its media is
resolved as the trainer resolves it (``data.media_root`` of the checkpoint's kept configuration unless
``--media-root``; else the record file's directory) and preprocessed with the run's budgets. Without
``--response`` the model answers greedily. For the chosen response tokens (default: the tokens inside
``<answer>...</answer>``, else the whole response) the last-layer attention policy rows (RAL's p_theta)
are averaged and split over the media:

    DIR/frames.png      attention mass per video frame (temporal step), bars over time
    DIR/patches.png     the mass per merged patch as a heatmap over each frame / image the model saw
    DIR/attention.json  the numbers drawn (per-frame masses, vision mass, tokens, settings)
    DIR/attention.pt    the rows and the token ids (``attention.dump`` format)
    DIR/curves.png      with --run: reward, held-out accuracy, attention JSD, vision mass from metrics.jsonl

Single process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_dtype, add_json
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.errors import UsageError


def parser() -> ToolParser:
    p = ToolParser(prog=prog_name("visualize_attention.py"), description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="Megatron checkpoint (a checkpoint or its run's checkpoints dir)")
    p.add_argument("--sample", default=None, help="one Video-R1 record: a JSON object or a file holding one")
    p.add_argument("--out", required=True, help="directory for the pictures (created)")
    p.add_argument("--response", default=None, help="response text to look at (default: the greedy answer)")
    p.add_argument("--tokens", default=None,
                   help="comma-separated 0-based response token indices (default: the answer's tokens)")
    p.add_argument("--config", default=None, help="training config whose data settings to use "
                                                  "(default: the one the checkpoint keeps)")
    p.add_argument("--media-root", default=None, help="directory the record's path is relative to")
    p.add_argument("--run", default=None, help="run directory: plot its training curves (metrics.jsonl)")
    add_dtype(p, "fp32")
    add_json(p, "the summary (pictures written, per-frame masses)")
    return p


def read_record(text: str):
    """The ``--sample`` argument as a parsed record and the directory it came from (None for inline JSON)."""
    from megatron_ral.data.records import parse_record

    path = Path(text)
    origin = None
    if not text.lstrip().startswith(("{", "[")) and path.is_file():
        text, origin = path.read_text(), path.parent
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--sample: neither a JSON record nor a file holding one ({e.msg})") from None
    if isinstance(obj, list):
        if len(obj) != 1:
            raise UsageError(f"--sample: an array of {len(obj)} records; give one")
        obj = obj[0]
    return parse_record(obj, "--sample"), origin


def answer_token_indices(tokenizer_decode, response_ids: list[int]) -> list[int]:
    """Indices of the response tokens whose text lies inside the first ``<answer>...</answer>`` (all tokens
    when there is none)."""
    ends, text = [], ""
    for i in range(len(response_ids)):
        text = tokenizer_decode(response_ids[: i + 1])
        ends.append(len(text))
    start = text.find("<answer>")
    stop = text.find("</answer>", start + 1) if start >= 0 else -1
    if start < 0 or stop < 0:
        return list(range(len(response_ids)))
    lo, hi = start + len("<answer>"), stop
    begins = [0] + ends[:-1]
    chosen = [i for i, (b, e) in enumerate(zip(begins, ends)) if e > lo and b < hi]
    return chosen or list(range(len(response_ids)))


def plot_run(run: str, out: Path) -> Path:
    from megatron_ral.cli.summary import read_metrics
    from megatron_ral.logging.plots import plot_curves

    return plot_curves(out / "curves.png", {Path(run).name: read_metrics(run)}, title=str(Path(run).name))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.ckpt is None and args.run is None:
        raise UsageError("give --ckpt CKPT --sample RECORD, or --run RUN_DIR (or both)")
    if args.ckpt is not None and args.sample is None:
        raise UsageError("--ckpt needs --sample RECORD")
    if args.response is not None and not args.response.strip():
        raise UsageError("--response is empty")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out}: not a directory")
    summary: dict = {"out": str(out)}
    if args.run is not None:
        if not Path(args.run).is_dir():
            raise UsageError(f"--run {args.run}: no such directory")
        out.mkdir(parents=True, exist_ok=True)
        summary["curves"] = str(plot_run(args.run, out))
    if args.ckpt is not None:
        summary.update(visualize(args, out))
    if args.json:
        print(json.dumps(summary))
    else:
        for key in ("curves", "frames", "patches", "numbers"):
            if key in summary:
                print(f"wrote {summary[key]}")
    sys.stdout.flush()
    return 0


def _chosen(args, decode, response_ids):
    if args.tokens is None:
        return answer_token_indices(decode, response_ids)
    try:
        chosen = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--tokens {args.tokens}: expected comma-separated integers") from None
    bad = [t for t in chosen if not 0 <= t < len(response_ids)]
    if not chosen or bad:
        raise UsageError(f"--tokens {args.tokens}: the response has tokens 0..{len(response_ids) - 1}")
    return chosen


def visualize(args, out: Path) -> dict:
    from megatron_ral.checkpoint.locate import find_hf_config_dir, megatron_checkpoint, processor_dir
    from megatron_ral.cli.run_settings import load_settings, settings_report

    dist_dir = megatron_checkpoint(args.ckpt, "--ckpt")
    model_dir = processor_dir(find_hf_config_dir(dist_dir, args.ckpt), "--ckpt")
    record, origin = read_record(args.sample)
    settings = load_settings(args.ckpt, args.config, dist_dir=dist_dir)
    data = settings.cfg.data
    if args.media_root is not None:
        settings.set("data.media_root", args.media_root)
    elif not data.media_root or not Path(data.media_root).is_dir():
        settings.set("data.media_root", str(origin or Path.cwd()), "the record's directory")
    check.input_dir(data.media_root, "--media-root")
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from megatron_ral.attention.dump import dump_attention
    from megatron_ral.attention.frames import frames_from_pixels, media_attention, vision_mass
    from megatron_ral.cli.model_flags import run_on_platform, torch_dtype
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.data.samples import SampleBuilder
    from megatron_ral.inference.generate import generate
    from megatron_ral.inference.loading import load_model, stop_token_ids
    from megatron_ral.inference.prompts import PromptInput
    from megatron_ral.logging.plots import plot_frame_bars, plot_patch_overlays

    processor = QwenVLProcessor.from_pretrained(str(model_dir))
    sample = SampleBuilder(processor, data, "prompt").build(record)
    images = [v for v in sample.vision if v.kind == "image"]
    videos = [v for v in sample.vision if v.kind == "video"]

    def cat(items, attr):
        return torch.cat([getattr(v, attr) for v in items]) if items else None

    def grids(items):
        return torch.tensor([list(v.grid_thw) for v in items]) if items else None

    prompt = PromptInput(sample.input_ids, cat(images, "pixel_values"), grids(images), cat(videos, "pixel_values"),
                         grids(videos), torch.tensor([v.second_per_grid_ts for v in videos]) if videos else None)
    stops = stop_token_ids(model_dir, processor.tokenizer)
    parallel = ParallelConfig()

    def work(info):
        model = load_model(dist_dir, parallel, dtype=torch_dtype(args.dtype))
        if args.response is None:
            (resp,), = generate(model, [prompt], settings.cfg.generation, greedy=True, stop_token_ids=stops,
                                suppress_token_ids=[model.image_token_id, model.video_token_id])
            ids = [t for t in resp.token_ids.tolist() if t not in set(stops)]
        else:
            ids = processor.tokenize(args.response)
        if not ids:
            raise UsageError("the response has no tokens" + (" (the model answered nothing)" if args.response is None else ""))
        return ids, dump_attention(model, prompt, ids)

    response_ids, dumped = run_on_platform(parallel, 0, work)
    decode = lambda ids: processor.decode(ids, skip_special_tokens=True)  # noqa: E731
    chosen = _chosen(args, decode, response_ids)
    rows = dumped["rows"][chosen].double()
    input_ids = dumped["input_ids"]
    torch.save(dumped, out / "attention.pt")
    params = processor.params
    m = params.merge_size
    result = {"response": decode(response_ids), "response_ids": response_ids, "chosen_tokens": chosen,
              "chosen_text": [decode([response_ids[i]]) for i in chosen],
              "vision_mass": vision_mass(rows, input_ids, [processor.image_token_id, processor.video_token_id]).tolist(),
              "settings": settings_report(settings)}
    panels, heats, titles = [], [], []
    for kind, items, token in (("video", videos, processor.video_token_id), ("image", images, processor.image_token_id)):
        if not items:
            continue
        secs = [v.second_per_grid_ts for v in items] if kind == "video" else None
        att = media_attention(rows, input_ids, token, grids(items), m, secs)
        mean = att.frame_mass.mean(dim=0)
        result[f"{kind}_frame_mass"] = mean.tolist()
        result[f"{kind}_frame_mass_per_token"] = att.frame_mass.tolist()
        result[f"{kind}_frame_start_seconds"] = att.start_seconds
        for f, (item, patch) in enumerate(zip(att.item, att.patch_mass)):
            v = items[item]
            pictures = frames_from_pixels(v.pixel_values, v.grid_thw, params.patch_size, m, params.temporal_patch_size,
                                          params.image_mean, params.image_std, params.rescale_factor)
            step = f - att.item.index(item)
            panels.append(pictures[step * params.temporal_patch_size].numpy())
            heats.append(patch.mean(dim=0).numpy())
            titles.append(f"{kind} {item}, t={att.start_seconds[f]:.1f}s: {float(mean[f]):.3f}" if kind == "video"
                          else f"image {item}: {float(mean[f]):.3f}")
        if kind == "video":
            labels = [f"{s:.1f}s" for s in att.start_seconds]
            result["frames"] = str(plot_frame_bars(
                out / "frames.png", mean.tolist(), labels, ylabel="attention mass",
                title=f"attention of {_quoted(result['chosen_text'])} per video frame "
                      f"(vision mass {sum(result['vision_mass']) / len(chosen):.3f})"))
    if panels:
        result["patches"] = str(plot_patch_overlays(out / "patches.png", panels, heats, titles,
                                                    suptitle=f"attention of {_quoted(result['chosen_text'])}"))
    numbers = out / "attention.json"
    numbers.write_text(json.dumps(result, indent=1) + "\n")
    result["numbers"] = str(numbers)
    return result


def _quoted(pieces: list[str], limit: int = 40) -> str:
    text = "".join(pieces).strip()
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def cli() -> NoReturn:
    run_main(prog_name("visualize_attention.py"), main)
