"""megatron_ral: Reinforced Attention Learning for Qwen2.5-VL on Megatron-Core."""

from setuptools import find_packages, setup

# torch and torchvision are pinned and installed first by scripts/setup.sh (they must come from
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

setup(
    name="megatron_ral",
    version="0.1.0",
    description="Megatron-Core post-training of Qwen2.5-VL with GRPO + Reinforced Attention Learning",
    packages=find_packages(include=["megatron_ral", "megatron_ral.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "video": ["nvidia-dali-cuda120>=2.2", "av>=12"],
        "gpu": ["transformer-engine[pytorch]"],
        "test": ["pytest>=8", "pytest-timeout"],
        # tools/bench/vs_trl.py only (the peer GRPO trainer it is compared with); never a core dependency.
        # Pinned: the comparison drives GRPOTrainer's batch building and loss directly.
        "bench": ["trl==1.16.0"],
    },
)
