"""Every command-line entry point on bad input: exit code 2, exactly one line on stderr
(``<tool>: error: <message naming the file, key or flag>``), no traceback, nothing on stdout and nothing
left behind (the case's output path does not exist, the inputs are unchanged).

One row per (tool, kind of mistake) where the argument applies: a missing path, a 0-byte file, truncated
media / checkpoint files, random bytes, an HF directory where a Megatron checkpoint is expected and the
reverse, an unknown config key, a wrong type, an out-of-range (sampling) value, a layout that does not
match the process count or the model, an unwritable output. Inputs are checked before any model is loaded,
so most rows cost an interpreter start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

# tool -> (command, program name in the error line, flags of a good invocation)
TOOLS = {
    "convert_hf_to_megatron": (["tools/convert_hf_to_megatron.py"], "convert_hf_to_megatron.py",
                               {"--hf": "{hf}", "--out": "{out}"}),
    "convert_megatron_to_hf": (["tools/convert_megatron_to_hf.py"], "convert_megatron_to_hf.py",
                               {"--ckpt": "{mc}", "--out": "{out}"}),
    "make_tiny_checkpoint": (["tools/make_tiny_checkpoint.py"], "make_tiny_checkpoint.py", {"--out": "{out}"}),
    "make_synthetic_videos": (["tools/make_synthetic_videos.py"], "make_synthetic_videos.py",
                              {"--out": "{out}", "--n": "4"}),
    "preprocess": (["tools/preprocess.py"], "preprocess.py",
                   {"--hf": "{hf}", "--video": "{ok_webm}", "--out": "{out}.pt"}),
    "generate": (["tools/generate.py"], "generate.py", {"--ckpt": "{mc}", "--prompt": "What moves?"}),
    "dump_attention": (["tools/dump_attention.py"], "dump_attention.py",
                       {"--ckpt": "{mc}", "--prompt": "What moves?", "--response": "A square.",
                        "--out": "{out}.pt"}),
    "config": (["-m", "megatron_ral.config"], "python -m megatron_ral.config", {}),
    "train": (["-m", "megatron_ral.train"], "megatron-ral-train", {}),
    "evaluate": (["tools/evaluate.py"], "evaluate.py", {"--ckpt": "{mc}", "--data": "{records_json}"}),
    "export_hf": (["tools/export_hf.py"], "export_hf.py", {"--run": "{mc}", "--out": "{out}"}),
    "plan_memory": (["tools/plan_memory.py"], "plan_memory.py", {"--student": "7b"}),
    "visualize_attention": (["tools/visualize_attention.py"], "visualize_attention.py",
                            {"--ckpt": "{mc}", "--sample": "{records_json}", "--out": "{out}"}),
}
# a trainer invocation that passes every check (the rows change one thing)
TRAIN_OK = ["model.load={mc}", "data.train_files=[{records_json}]", "training.run_dir={out}"]


@dataclass
class Case:
    tool: str
    change: dict  # flag -> value ("{placeholder}" formatted; None drops the flag; True: a bare flag)
    message: str  # expected in the error line (formatted like the values)
    extra: list = field(default_factory=list)  # positional arguments (config overrides)

    def argv(self, paths: dict) -> list[str]:
        flags = {**TOOLS[self.tool][2], **self.change}
        out = []
        for flag, value in flags.items():
            if value is None:
                continue
            out += [flag] if value is True else [flag, value.format(**paths)]
        return out + [x.format(**paths) for x in self.extra]


C = Case
CASES = {
    # convert_hf_to_megatron
    "hf2mc-missing": C("convert_hf_to_megatron", {"--hf": "/nonexistent/hf"}, "--hf /nonexistent/hf: no such directory"),
    "hf2mc-zero-byte": C("convert_hf_to_megatron", {"--hf": "{zero_mp4}"}, "--hf {zero_mp4}: not a directory"),
    "hf2mc-megatron-dir": C("convert_hf_to_megatron", {"--hf": "{mc}"}, "a Megatron checkpoint, not a Hugging Face one"),
    "hf2mc-truncated": C("convert_hf_to_megatron", {"--hf": "{hf_trunc}"}, "model.safetensors: corrupt or truncated"),
    "hf2mc-random-bytes": C("convert_hf_to_megatron", {"--hf": "{hf_random}"}, "model.safetensors: corrupt"),
    "hf2mc-wrong-type": C("convert_hf_to_megatron", {"--hf": "{hf_badtype}"}, "config.json: a size in the config is not an integer"),
    "hf2mc-unwritable": C("convert_hf_to_megatron", {"--out": "{a_file}/mc"}, "--out {a_file}/mc: {a_file} is not a directory"),
    "hf2mc-out-not-empty": C("convert_hf_to_megatron", {"--out": "{nonempty}"}, "--out {nonempty}: exists and is not empty"),
    # convert_megatron_to_hf
    "mc2hf-missing": C("convert_megatron_to_hf", {"--ckpt": "/nonexistent/ckpt"}, "--ckpt /nonexistent/ckpt: no such directory"),
    "mc2hf-zero-byte": C("convert_megatron_to_hf", {"--ckpt": "{zero_mp4}"}, "--ckpt {zero_mp4}: not a directory"),
    "mc2hf-hf-dir": C("convert_megatron_to_hf", {"--ckpt": "{hf}"}, "a Hugging Face checkpoint (*.safetensors), not a Megatron one"),
    "mc2hf-truncated": C("convert_megatron_to_hf", {"--ckpt": "{mc_trunc}"}, "truncated"),
    "mc2hf-random-bytes": C("convert_megatron_to_hf", {"--ckpt": "{mc_random}"}, "/metadata.json: corrupt"),
    "mc2hf-hf-config-missing": C("convert_megatron_to_hf", {"--hf-config": "/nonexistent/cfg"}, "--hf-config /nonexistent/cfg: no such directory"),
    "mc2hf-unwritable": C("convert_megatron_to_hf", {"--out": "{a_file}/hf"}, "--out {a_file}/hf: {a_file} is not a directory"),
    # make_tiny_checkpoint
    "tiny-json-missing": C("make_tiny_checkpoint", {"--config-json": "/nonexistent.json"}, "--config-json /nonexistent.json: no such file"),
    "tiny-json-zero-byte": C("make_tiny_checkpoint", {"--config-json": "{empty_json}"}, "--config-json {empty_json}: empty file"),
    "tiny-json-random-bytes": C("make_tiny_checkpoint", {"--config-json": "{random_bin}"}, "--config-json {random_bin}: not valid JSON"),
    "tiny-unknown-key": C("make_tiny_checkpoint", {"--config-json": "{unknown_key_json}"}, "text_config.num_attention_head: unknown key for a Qwen2.5-VL config (did you mean 'num_attention_heads'?)"),
    "tiny-wrong-type": C("make_tiny_checkpoint", {"--config-json": "{wrong_type_json}"}, "text_config.num_attention_heads: expected an integer, got 'four'"),
    "tiny-bad-value": C("make_tiny_checkpoint", {"--config-json": "{bad_value_json}"}, "mrope_section: [2, 2, 2] must sum to head_dim/2 = 8"),
    "tiny-bad-preset": C("make_tiny_checkpoint", {"--preset": "huge"}, "argument --preset: invalid choice: 'huge'"),
    "tiny-unwritable": C("make_tiny_checkpoint", {"--out": "{a_file}/ckpt"}, "--out {a_file}/ckpt: {a_file} is not a directory"),
    # make_synthetic_videos
    "synthetic-n-zero": C("make_synthetic_videos", {"--n": "0"}, "--n 0: must be >= 1"),
    "synthetic-wrong-type": C("make_synthetic_videos", {"--n": "many"}, "argument --n: invalid int value: 'many'"),
    "synthetic-odd-size": C("make_synthetic_videos", {"--height": "63"}, "--height 63: must be even"),
    "synthetic-fraction": C("make_synthetic_videos", {"--image-fraction": "2"}, "--image-fraction 2.0: must be in [0, 1]"),
    "synthetic-unwritable": C("make_synthetic_videos", {"--out": "{a_file}/data"}, "--out {a_file}/data: {a_file} is not a directory"),
    "synthetic-out-not-empty": C("make_synthetic_videos", {"--out": "{nonempty}"}, "--out {nonempty}: exists and is not empty"),
    # preprocess
    "preprocess-hf-missing": C("preprocess", {"--hf": "/nonexistent/hf"}, "--hf /nonexistent/hf: no such directory"),
    "preprocess-hf-zero-byte": C("preprocess", {"--hf": "{zero_mp4}"}, "--hf {zero_mp4}: not a directory"),
    "preprocess-video-missing": C("preprocess", {"--video": "/nonexistent/clip.mp4"}, "--video /nonexistent/clip.mp4: no such file (missing_file)"),
    "preprocess-video-zero-byte": C("preprocess", {"--video": "{zero_mp4}"}, "--video {zero_mp4}: file is empty (empty_file)"),
    "preprocess-video-truncated": C("preprocess", {"--video": "{trunc_webm}"}, "--video {trunc_webm}: cannot open container"),
    "preprocess-video-random-bytes": C("preprocess", {"--video": "{random_mp4}"}, "--video {random_mp4}: cannot open container"),
    "preprocess-image-truncated": C("preprocess", {"--video": None, "--image": "{trunc_png}"}, "--image {trunc_png}: not a readable image"),
    "preprocess-image-random-bytes": C("preprocess", {"--video": None, "--image": "{random_png}"}, "--image {random_png}: not a readable image"),
    "preprocess-fps-range": C("preprocess", {"--fps": "0"}, "--fps 0.0: must be > 0"),
    "preprocess-pixels": C("preprocess", {"--min-pixels": "5000", "--max-pixels": "100"}, "--min-pixels 5000: exceeds --max-pixels 100"),
    "preprocess-unwritable": C("preprocess", {"--out": "{a_file}/s.pt"}, "--out {a_file}/s.pt: {a_file} is not a directory"),
    # generate
    "generate-ckpt-missing": C("generate", {"--ckpt": "/nonexistent/ckpt"}, "--ckpt /nonexistent/ckpt: no such directory"),
    "generate-ckpt-zero-byte": C("generate", {"--ckpt": "{zero_mp4}"}, "--ckpt {zero_mp4}: not a directory"),
    "generate-hf-dir": C("generate", {"--ckpt": "{hf}"}, "--ckpt {hf}: a Hugging Face checkpoint (*.safetensors), not a Megatron one"),
    "generate-video-zero-byte": C("generate", {"--video": "{zero_mp4}"}, "--video {zero_mp4}: file is empty"),
    "generate-video-truncated": C("generate", {"--video": "{trunc_webm}"}, "--video {trunc_webm}: cannot open container"),
    "generate-image-random-bytes": C("generate", {"--image": "{random_png}"}, "--image {random_png}: not a readable image"),
    "generate-temperature": C("generate", {"--temperature": "-1"}, "--temperature -1.0: must be >= 0"),
    "generate-top-p": C("generate", {"--top-p": "2"}, "--top-p 2.0: must be in (0, 1]"),
    "generate-top-k": C("generate", {"--top-k": "-3"}, "--top-k -3: must be >= 0"),
    "generate-max-new-tokens": C("generate", {"--max-new-tokens": "0"}, "--max-new-tokens 0: must be >= 1"),
    "generate-greedy-and-sampling": C("generate", {"--greedy": True, "--temperature": "0.5"}, "--greedy excludes --temperature"),
    "generate-wrong-type": C("generate", {"--tp": "two"}, "argument --tp: invalid int value: 'two'"),
    "generate-layout-processes": C("generate", {"--tp": "2"}, "1 process(es) but --tp 2 x --pp 1 = 2; run torchrun --nproc-per-node 2"),
    "generate-pp-split": C("generate", {"--pp-split": "1,x"}, "--pp-split '1,x': expected comma-separated integers"),
    # dump_attention
    "dump-ckpt-missing": C("dump_attention", {"--ckpt": "/nonexistent/ckpt"}, "--ckpt /nonexistent/ckpt: no such directory"),
    "dump-hf-dir": C("dump_attention", {"--ckpt": "{hf}"}, "a Hugging Face checkpoint (*.safetensors), not a Megatron one"),
    "dump-video-random-bytes": C("dump_attention", {"--video": "{random_mp4}"}, "--video {random_mp4}: cannot open container"),
    "dump-response-empty": C("dump_attention", {"--response": "   "}, "--response is empty"),
    "dump-out-missing-dir": C("dump_attention", {"--out": "/nonexistent/dir/rows.pt"}, "--out /nonexistent/dir/rows.pt: directory /nonexistent/dir does not exist"),
    "dump-out-is-dir": C("dump_attention", {"--out": "{nonempty}"}, "--out {nonempty}: is a directory"),
    "dump-pp-split": C("dump_attention", {"--pp-split": "2,1"}, "--pp-split 2,1: need one positive layer count per pipeline stage (1)"),
    "dump-tp-zero": C("dump_attention", {"--tp": "0"}, "--tp and --pp must be >= 1, got --tp 0 --pp 1"),
    "dump-dtype": C("dump_attention", {"--dtype": "fp64"}, "argument --dtype: invalid choice: 'fp64'"),
    # python -m megatron_ral.config
    "config-missing": C("config", {"--config": "/nonexistent.yaml"}, "config error: --config: file not found: /nonexistent.yaml"),
    "config-zero-byte": C("config", {"--config": "{empty_yaml}"}, "config error: --config: {empty_yaml} is empty"),
    "config-random-bytes": C("config", {"--config": "{random_bin}"}, "config error: --config: {random_bin} is not a text file"),
    "config-unknown-key": C("config", {"--config": "{unknown_key_yaml}"}, "config error: algorithm.lambda_atn: unknown key (did you mean 'algorithm.lambda_attn'?)"),
    "config-wrong-type": C("config", {"--config": "{wrong_type_yaml}"}, "config error: parallel.tensor_model_parallel_size: expected an integer, got 'two'"),
    "config-sampling-range": C("config", {}, "config error: generation.top_p: must be in (0, 1], got 2.0", ["generation.top_p=2"]),
    "config-layout": C("config", {"--world-size": "3"}, "config error: parallel.tensor_model_parallel_size: world size 3 must be divisible by TP*PP*CP = 2*1*1 = 2", ["parallel.tensor_model_parallel_size=2"]),
    "config-sequence-parallel-on-cpu": C("config", {}, "config error: parallel.sequence_parallel: needs CUDA and Transformer Engine", ["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2"]),
    "config-override-syntax": C("config", {}, "config error: algorithm.lambda_attn: override must look like section.key=value", ["algorithm.lambda_attn"]),
    # evaluate
    "export-run-missing": C("export_hf", {"--run": "/nonexistent/run"}, "--run /nonexistent/run: no such directory"),
    "plan-student-unknown": C("plan_memory", {"--student": "nosuch"},
                              "--student: nosuch: neither a preset (3b, 7b, 32b) nor an HF directory / config.json file"),
    "visualize-ckpt-missing": C("visualize_attention", {"--ckpt": "/nonexistent/ck"},
                                "--ckpt /nonexistent/ck: no such directory"),
    "evaluate-ckpt-missing": C("evaluate", {"--ckpt": "/nonexistent/ckpt"}, "--ckpt /nonexistent/ckpt: no such directory"),
    "evaluate-hf-dir": C("evaluate", {"--ckpt": "{hf}"}, "--ckpt {hf}: a Hugging Face checkpoint (*.safetensors), not a Megatron one"),
    "evaluate-data-missing": C("evaluate", {"--data": "/nonexistent/test.json"}, "--data /nonexistent/test.json: no such file"),
    "evaluate-layout-processes": C("evaluate", {"--tp": "2"}, "1 process(es) is not a multiple of --tp 2 x --pp 1"),
    "evaluate-max-records": C("evaluate", {"--max-records": "0"}, "--max-records 0: must be >= 1"),
    "evaluate-template": C("evaluate", {"--template": "cot"}, "argument --template: invalid choice: 'cot'"),
    "evaluate-unknown-key": C("evaluate", {}, "config error: data.fsp: unknown key (did you mean 'data.fps'?)", ["data.fsp=2"]),
    # the trainer (python -m megatron_ral.train / megatron-ral-train)
    "train-config-missing": C("train", {"--config": "/nonexistent.yaml"}, "config error: --config: file not found: /nonexistent.yaml"),
    "train-unknown-key": C("train", {}, "config error: algorithm.lamda_attn: unknown key (did you mean 'algorithm.lambda_attn'?)", TRAIN_OK + ["algorithm.lamda_attn=1"]),
    "train-wrong-type": C("train", {}, "config error: training.prompts_per_step: expected an integer, got 'two'", TRAIN_OK + ["training.prompts_per_step=two"]),
    "train-sampling-range": C("train", {}, "config error: generation.top_p: must be in (0, 1], got 2.0", TRAIN_OK + ["generation.top_p=2"]),
    "train-layout": C("train", {}, "config error: parallel.tensor_model_parallel_size: world size 1 must be divisible by TP*PP*CP = 2*1*1 = 2", TRAIN_OK + ["parallel.tensor_model_parallel_size=2"]),
    "train-load-missing": C("train", {}, "model.load /nonexistent/ckpt: no such directory", TRAIN_OK + ["model.load=/nonexistent/ckpt"]),
    "train-load-hf-dir": C("train", {}, "model.load {hf}: a Hugging Face checkpoint (*.safetensors), not a Megatron one", TRAIN_OK + ["model.load={hf}"]),
    "train-hf-path-megatron-dir": C("train", {}, "model.hf_path {mc}: a Megatron checkpoint, not a Hugging Face one", ["model.hf_path={mc}", "data.train_files=[{records_json}]", "training.run_dir={out}"]),
    "train-records-missing": C("train", {}, "data.train_files /nonexistent/train.json: no such file", TRAIN_OK + ["data.train_files=[/nonexistent/train.json]"]),
    "train-records-zero-byte": C("train", {}, "data.eval_files {empty_json}: empty file", TRAIN_OK + ["data.eval_files=[{empty_json}]"]),
    "train-records-random-bytes": C("train", {}, "data.train_files {random_bin}: not a JSON array or JSON lines file", TRAIN_OK + ["data.train_files=[{random_bin}]"]),
    "train-unwritable": C("train", {}, "training.run_dir {a_file}/run: {a_file} is not a directory", TRAIN_OK + ["training.run_dir={a_file}/run"]),
}


def _snapshot(*dirs) -> dict:
    """{path: (size, mtime_ns)} of everything under ``dirs``."""
    out = {}
    for d in dirs:
        for base, subdirs, files in os.walk(d):
            for name in subdirs + files:
                st = os.lstat(os.path.join(base, name))
                out[os.path.join(base, name)] = (st.st_size, st.st_mtime_ns)
    return out


def run_tool(command: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGATRON_RAL_DEBUG"):
        env.pop(key, None)
    cmd = [sys.executable, *[str(ROOT / c) if c.startswith("tools/") else c for c in command], *argv]
    return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(name, bad_inputs, tmp_path):
    case = CASES[name]
    if name == "config-sequence-parallel-on-cpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("the rule applies on machines without CUDA")
    command, prog, _ = TOOLS[case.tool]
    paths = {**bad_inputs, "out": str(tmp_path / "out")}
    work = tmp_path / "cwd"
    work.mkdir()
    before = _snapshot(bad_inputs["root"], bad_inputs["hf"], bad_inputs["mc"])
    proc = run_tool(command, case.argv(paths), cwd=work)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert case.message.format(**paths) in lines[0], lines[0]
    assert proc.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["cwd"] and not os.listdir(work), "output left behind"
    assert _snapshot(bad_inputs["root"], bad_inputs["hf"], bad_inputs["mc"]) == before, "inputs changed"


def test_table_covers_every_tool():
    assert {c.tool for c in CASES.values()} == set(TOOLS)
    assert {p.stem for p in (ROOT / "tools").glob("*.py")} == set(TOOLS) - {"config", "train"}
