"""Decode throughput and peak memory of the video backends on the same clips (tools/bench/decode.py)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import tempfile
import time

import numpy as np

from megatron_ral.cli.arguments import ToolParser
from megatron_ral.cli.entry import prog_name, run_main


def make_clips(out_dir: str, n: int = 3, seconds: float = 20.0, fps: int = 30, width: int = 640, height: int = 360,
               codec: str = "vp9", gop: int = 60, seed: int = 0) -> list[str]:
    """Write `n` textured clips with moving shapes (VP9 WebM by default, keyframe every `gop` frames)."""
    import av

    from megatron_ral.data.synthetic import CODECS

    encoder, ext = CODECS[codec]
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    frames = int(round(seconds * fps))
    yy, xx = np.mgrid[0:height, 0:width]
    for c in range(n):
        path = os.path.join(out_dir, f"clip{c}.{ext}")
        paths.append(path)
        if os.path.exists(path):
            continue
        texture = rng.integers(0, 60, size=(height, width, 1), dtype=np.uint8)
        with av.open(path, "w") as container:
            stream = container.add_stream(encoder, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.gop_size = gop
            if codec == "vp9":
                stream.options = {"crf": "32", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
            else:
                stream.options = {"preset": "ultrafast", "crf": "23"}
            for i in range(frames):
                img = np.empty((height, width, 3), np.uint8)
                img[..., 0] = (xx * 255 // width).astype(np.uint8)
                img[..., 1] = (yy * 255 // height).astype(np.uint8)
                img[..., 2] = (i * 4 + 40 * c) % 256
                img += texture
                x = int((i * 7) % (width - 80))
                y = int((height - 80) * (0.5 + 0.4 * np.sin(i / 15)))
                img[y : y + 80, x : x + 80] = (230, 40, 40)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return paths


def _cpu_s() -> float:
    """User + system CPU time of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_backend(backend: str, paths: list[str], fps: float, max_frames: int, repeats: int, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from megatron_ral.data.video.backend import VideoDecoders
    from megatron_ral.data.video.probe import probe_video
    from megatron_ral.data.video.sampling import plan_frames

    decoders = VideoDecoders(backend, "cpu")
    baseline = _rss_mb()
    # Warm-up: build the pipeline / load codecs on the first clip (not timed).
    info = probe_video(paths[0])
    choice = decoders.choose(info.codec, info.colour)
    decoders.decoder(choice).decode(info, [0])
    frames, seconds, cpu = 0, 0.0, 0.0
    for _ in range(repeats):
        for path in paths:
            c0, t0 = _cpu_s(), time.perf_counter()
            info = probe_video(path)
            plan = plan_frames(info.total_frames, info.fps, fps, 4, max_frames)
            out = decoders.decoder(choice).decode(info, plan.indices)
            seconds += time.perf_counter() - t0
            cpu += _cpu_s() - c0
            frames += int(out.shape[0])
    queue.put({"backend": choice.backend, "device": choice.device, "codec": info.codec, "fps": fps, "frames": frames,
               "seconds": round(seconds, 4), "frames_per_s": round(frames / seconds, 2),
               "cpu_seconds": round(cpu, 4), "frames_per_cpu_s": round(frames / cpu, 2) if cpu > 0 else None,
               "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(_rss_mb(), 1),
               "peak_rss_delta_mb": round(_rss_mb() - baseline, 1)})


def run_decode_benchmark(paths: list[str], backends=("dali", "pyav"), fps_values=(1.0, 2.0), max_frames: int = 768,
                         repeats: int = 1) -> list[dict]:
    """One fresh process per (backend, fps): frames/s of probe + decode of the Qwen-sampled frames, and peak RSS."""
    ctx = mp.get_context("spawn")
    results = []
    for fps in fps_values:
        for backend in backends:
            queue = ctx.Queue()
            proc = ctx.Process(target=_run_backend, args=(backend, paths, fps, max_frames, repeats, queue))
            proc.start()
            result = queue.get(timeout=1800)
            proc.join()
            results.append(result)
    return results


# --- the command (tools/bench/decode.py) ----------------------------------

def main(argv: list[str] | None = None) -> int:
    p = ToolParser(prog=prog_name("decode.py"), description=__doc__)
    p.add_argument("--clips", default=None, help="directory for the generated clips (default: a temp dir)")
    p.add_argument("--n", type=int, default=3, help="number of clips")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each clip")
    p.add_argument("--size", default="640x360", help="WIDTHxHEIGHT")
    p.add_argument("--video-fps", type=int, default=30, help="frame rate of the clips")
    p.add_argument("--fps", type=float, nargs="+", default=[1.0, 2.0], help="sampling rates to measure")
    p.add_argument("--backends", nargs="+", default=["dali", "pyav"], choices=["dali", "pyav"], help="decoders to measure")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per case")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    clips = args.clips or os.path.join(tempfile.gettempdir(), f"megatron_ral_decode_bench_{width}x{height}_{args.video_fps}_{args.seconds:g}s")
    paths = make_clips(clips, n=args.n, seconds=args.seconds, fps=args.video_fps, width=width, height=height)
    results = run_decode_benchmark(paths, backends=args.backends, fps_values=args.fps, repeats=args.repeats)
    print(json.dumps({"clips": {"n": args.n, "seconds": args.seconds, "size": f"{width}x{height}",
                                "video_fps": args.video_fps, "codec": "vp9"}, "results": results}))
    return 0


def cli() -> None:
    """``python tools/bench/decode.py`` and ``python -m megatron_ral.bench.decode``."""
    run_main(prog_name("decode.py"), main)


if __name__ == "__main__":
    cli()
