"""megatron_growloop: looped and depth-grown LLM pretraining on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_growloop",
    version="0.1.0",
    description="Looped (Loop(e-LxK-d)) and depth-grown (MIDAS/LIDAS) LLM pretraining on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_growloop", "megatron_growloop.*"]),
    package_data={"megatron_growloop.data": ["words_en.txt"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",  # the tested range (tests/test_megatron_private_hooks.py)
        "numpy",
        "packaging",
        "tensorboard",
        "transformers>=4.46",
        "tokenizers",
        "safetensors",
        "gguf",
        "matplotlib",
        "psutil",  # megatron-core's torch_dist checkpoint writer measures memory with it
    ],
    extras_require={
        # GPU clusters: Transformer Engine (with its PyTorch part) and flash-attention.
        # apex is optional and not listed (build it from source if you want its fused kernels).
        "gpu": ["transformer_engine[pytorch]>=2.9", "flash-attn>=2.6"],
        "eval": ["lm-eval>=0.4.8", "accelerate"],
        "dev": ["pytest>=8", "lm-eval>=0.4.8", "accelerate"],
    },
    entry_points={
        "console_scripts": [
            "growloop-pretrain=megatron_growloop.pretrain:main",
        ]
    },
)
