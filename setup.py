from setuptools import find_packages, setup

# TensorFlow comes through an extra, never as a base requirement: TensorFlow ships as two
# distributions holding the same modules (tensorflow, and the smaller CPU-only tensorflow-cpu), and
# a base requirement on one would install it next to the other. tensorflow-cpu exists for Linux
# x86-64 and Windows x86-64; elsewhere the plain build is CPU-only anyway.
CPU_ONLY_BUILD = (
    "(sys_platform == 'linux' and platform_machine == 'x86_64') "
    "or (sys_platform == 'win32' and platform_machine == 'AMD64')"
)
OTHER_PLATFORMS = (
    "sys_platform == 'darwin' or (sys_platform == 'linux' and platform_machine != 'x86_64') "
    "or (sys_platform == 'win32' and platform_machine != 'AMD64')"
)

setup(
    name="gpt2-tf2",
    version="0.1.0",
    description="OpenAI's GPT-2 in pure TensorFlow 2 / Keras 3, reading OpenAI's original checkpoints",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gpt2", "gpt2.*", "encoder", "encoder.*"]),
    package_data={
        "encoder": ["encoder.json", "vocab.bpe"],
        "gpt2.serve": ["static/*.html"],
    },
    py_modules=[],
    install_requires=["numpy", "regex", "requests", "tqdm"],
    extras_require={
        "cpu": [f"tensorflow-cpu>=2.16; {CPU_ONLY_BUILD}", f"tensorflow>=2.16; {OTHER_PLATFORMS}"],
        "gpu": ["tensorflow[and-cuda]>=2.16; sys_platform == 'linux'", "tensorflow>=2.16; sys_platform != 'linux'"],
        # hf: Hugging Face folders (gpt2.formats.hf, python -m gpt2.convert); OpenAI checkpoints need nothing more.
        "hf": ["safetensors>=0.4.5"],
        "test": ["pytest", "pytest-xdist", "openai", "safetensors>=0.4.5", "selenium", "tiktoken", "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": [
            "gpt2-generate=gpt2.generate_cli:main",
            "gpt2-download=gpt2.download:main",
            "gpt2-serve=gpt2.serve:main",
            "gpt2-convert=gpt2.convert:main",
            "gpt2-evaluate=gpt2.evaluate:main",
            "gpt2-train=gpt2.train.cli:main",
            "gpt2-export=gpt2.export:main",
        ]
    },
)
