"""megatron_ral: Reinforced Attention Learning for Qwen2.5-VL on Megatron-Core."""

from setuptools import find_packages, setup

# Version ranges here; the exact tested versions are in constraints.txt, which scripts/setup.sh installs
# with. torch and torchvision are pinned and installed first by scripts/setup.sh (they must come from
# a known build; an unpinned torch pulls a multi-GB wheel). They are listed here unpinned so that
# an NGC container's own torch is accepted as it is.
INSTALL_REQUIRES = [
    "torch",
    "torchvision",
    "megatron-core>=0.16.1",
    "transformers>=4.57",
    "safetensors",
    "tokenizers",
    "psutil",
    "pyyaml",
    "wandb",
    "sentencepiece",
    "numpy",
    "pillow",
    "einops",
    "rouge-score>=0.1.2",  # free-form reward (rl/rewards.py): the ROUGE implementation Video-R1 uses
]

# Console scripts: each runs the same function as tools/<name>.py (megatron_ral/cli holds every command line).
CONSOLE_SCRIPTS = [
    "megatron-ral-train = megatron_ral.cli.train:cli",
    "megatron-ral-config = megatron_ral.cli.config:cli",
    "megatron-ral-convert-hf-to-megatron = megatron_ral.cli.convert_hf_to_megatron:cli",
    "megatron-ral-convert-megatron-to-hf = megatron_ral.cli.convert_megatron_to_hf:cli",
    "megatron-ral-make-tiny-checkpoint = megatron_ral.cli.make_tiny_checkpoint:cli",
    "megatron-ral-make-synthetic-videos = megatron_ral.cli.make_synthetic_videos:cli",
    "megatron-ral-preprocess = megatron_ral.cli.preprocess:cli",
    "megatron-ral-generate = megatron_ral.cli.generate:cli",
    "megatron-ral-dump-attention = megatron_ral.cli.dump_attention:cli",
    "megatron-ral-evaluate = megatron_ral.cli.evaluate:cli",
    "megatron-ral-plan-memory = megatron_ral.cli.plan_memory:cli",
    "megatron-ral-export-hf = megatron_ral.cli.export_hf:cli",
    "megatron-ral-visualize-attention = megatron_ral.cli.visualize_attention:cli",
]

setup(
    name="megatron_ral",
    version="0.1.0",
    description="Megatron-Core post-training of Qwen2.5-VL with GRPO + Reinforced Attention Learning",
    packages=find_packages(include=["megatron_ral", "megatron_ral.*"]),
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "video": ["nvidia-dali-cuda120>=2.2", "av>=12"],
        "gpu": ["transformer-engine[pytorch]"],
        "test": ["pytest>=8", "pytest-timeout"],
        # pictures: tools/visualize_attention.py, the quickstart's curves.png (megatron_ral/logging/plots.py)
        "plot": ["matplotlib"],
        # tools/bench/vs_trl.py only (the peer GRPO trainer it is compared with); never a core dependency.
        # Pinned: the comparison drives GRPOTrainer's batch building and loss directly.
        "bench": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
