"""Command-line front ends of the model family: `minimind convert` and `minimind tokenizer`."""
