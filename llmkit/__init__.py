"""llmkit: pretrain and fine-tune Hugging Face transformers from YAML recipes."""

__version__ = "0.1.0"
