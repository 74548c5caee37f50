from setuptools import find_packages, setup

setup(
    name="hf_rlprune",
    version="0.1.0",
    description="Structured pruning of Hugging Face models with a PPO agent, as a Trainer callback",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hf_rlprune", "hf_rlprune.*"]),
    package_data={"hf_rlprune": ["templates/*.md"]},
    python_requires=">=3.10",
    # Floors are what the lent GPU image ships (torch 2.11, transformers 5.17); torch is installed first
    # (pip install torch==2.13.0 on CPU) so that this range never pulls a CUDA build by accident.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=2.21",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "gymnasium>=1.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "onnxscript>=0.1",
        "Jinja2>=3.1",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100", "scipy>=1.11", "optuna>=3.0"],
        "bench": ["scipy>=1.11"],
    },
)
