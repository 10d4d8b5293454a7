"""The shipped demo model: a procedural captioned dataset, its tokenizer, and the training script."""
