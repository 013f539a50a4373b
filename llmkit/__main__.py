"""`python -m llmkit`, so `torchrun -m llmkit ...` and `accelerate launch -m llmkit ...` work."""

from llmkit.cli import main

if __name__ == "__main__":
    main()
