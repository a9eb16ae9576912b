"""Fine-tuning GPT-2: `gpt2.finetune(model, dataset, output, ...)` and `python train.py`.

Modules: data (datasets, token cache, windows), lora (low-rank adapters), optim (AdamW and the
learning-rate schedule), state (output folder and training state), trainer (the loop), cli
(the command line). Importing this package does not import TensorFlow.
"""
