from setuptools import find_packages, setup

setup(
    name="gpt2-tf2",
    version="0.1.0",
    description="OpenAI's GPT-2 in pure TensorFlow 2 / Keras 3, reading OpenAI's original checkpoints",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gpt2", "gpt2.*", "encoder"]),
    package_data={"encoder": ["encoder.json", "vocab.bpe"], "gpt2.serve": ["static/*.html"]},
    py_modules=[],
    install_requires=["tensorflow>=2.16", "numpy", "regex", "requests", "tqdm"],
    # hf: Hugging Face folders (gpt2.hf, python -m gpt2.convert); OpenAI checkpoints need nothing more.
    extras_require={"hf": ["safetensors>=0.4.5"], "test": ["pytest", "openai", "safetensors>=0.4.5", "selenium"]},
    entry_points={
        "console_scripts": [
            "gpt2-generate=gpt2.generate_cli:main",
            "gpt2-download=gpt2.download:main",
            "gpt2-serve=gpt2.serve:main",
            "gpt2-convert=gpt2.convert:main",
            "gpt2-evaluate=gpt2.evaluate:main",
        ]
    },
)
