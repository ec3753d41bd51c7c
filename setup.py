from setuptools import setup

# `kernels/` ships as `racro_fast.kernels`: a top-level `kernels` package would shadow the
# one transformers imports.
setup(
    name="racro_fast",
    version="0.1.0",
    description="Performance-first GRPO trainer for RACRO caption reward optimisation",
    python_requires=">=3.10",
    packages=["racro_fast", "racro_fast.kernels"],
    package_dir={"racro_fast": "racro_fast", "racro_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.16,<5.20",
        "math-verify>=0.8",
        "safetensors",
        "pyarrow",
        "pillow",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["vllm>=0.33", "flash-attn", "liger-kernel", "deepspeed"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "liger-kernel", "psutil", "trl==1.16.0"],
        "log": ["tensorboard", "wandb"],
    },
    entry_points={"console_scripts": ["racro-fast=racro_fast.cli:main"]},
)
